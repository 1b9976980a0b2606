"""Which records count as reproductions, and each row's verdict against the table's reference.

One rule decides whether a result record is a reproduction (`standing`): the row's full planned budget,
on Cityscapes with the official split sizes, from the row's expected starting weights. Everything else is
kept and shown apart, never averaged into the measured column.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from harness import paths
from harness.errors import BenchError
from harness.spec import Spec

OFFICIAL_TRAIN_IMAGES = 2975  # Cityscapes gtFine train
OFFICIAL_VAL_IMAGES = 500  # Cityscapes gtFine val: the split every reference figure was measured on
DEFAULT_TOLERANCE = 0.5  # mIoU points; mmsegmentation's regression range for Cityscapes results
LIGHTSEG_SUFFIX = "-lightseg"

# Kinds of record, in the order benchmark.md lists the ones that do not count.
REPRODUCTION = "reproduction"
OTHER_DATA = "other data"
SMOKE = "smoke"
PARTIAL = "partial"
RANDOM_START = "random start"
EVALUATION = "evaluation"
NOT_COUNTED = (OTHER_DATA, SMOKE, PARTIAL, RANDOM_START)

# Verdicts
REPRODUCED = "reproduced"
BELOW = "below"
ABOVE = "above"
NOT_RUN = "not run"
IN_PROGRESS = "in progress"
OUTSIDE = (BELOW, ABOVE)


def planned_iterations(spec: Spec) -> int:
    """The row's full budget on the official train split, as `bench run` plans it (harness.runner.make_plan):
    the table's epochs of ceil(2975 / global batch) iterations."""
    from harness.train import iterations_per_epoch  # torch is only needed once records are classified

    return spec.columns.epochs * iterations_per_epoch(OFFICIAL_TRAIN_IMAGES, spec.columns.batch_size)


@dataclass(frozen=True)
class Standing:
    kind: str  # REPRODUCTION or one of NOT_COUNTED (or EVALUATION for `bench eval` records)
    reason: str  # one line: why it does not count ("" for a reproduction)

    @property
    def counts(self) -> bool:
        return self.kind == REPRODUCTION


def standing(spec: Spec, record: dict[str, Any]) -> Standing:
    """The one rule: a record is a reproduction of `spec`'s row only if it trained the full planned budget on
    Cityscapes with the official split (500 val images), from the row's expected starting weights.

    The first failing condition names the kind: other data (not the official split, or split sizes not
    recorded), smoke (less than one epoch of the plan), partial (another number of iterations), random start."""
    if record.get("kind", "train") != "train":
        return Standing(EVALUATION, "an evaluation of a checkpoint, not a training run")
    if record.get("dataset") != "cityscapes":
        return Standing(OTHER_DATA, f"dataset {record.get('dataset')!r}, not Cityscapes")
    val, train = record.get("val_images"), record.get("train_images")
    if val is None or train is None:
        return Standing(OTHER_DATA, "the record does not say how many train/val images it used")
    if val != OFFICIAL_VAL_IMAGES or train != OFFICIAL_TRAIN_IMAGES:
        return Standing(OTHER_DATA, f"{train} train / {val} val images, not the official "
                                    f"{OFFICIAL_TRAIN_IMAGES} / {OFFICIAL_VAL_IMAGES}")
    planned, done = planned_iterations(spec), record.get("iterations")
    if done != planned:
        one_epoch = planned // spec.columns.epochs
        kind = SMOKE if done is None or done < one_epoch else PARTIAL
        return Standing(kind, f"{done} of the {planned} planned iterations")
    weights = str(record.get("starting_weights", ""))
    if weights.startswith("missing"):
        return Standing(RANDOM_START, f"started without the row's weights ({weights})")
    return Standing(REPRODUCTION, "")


def is_lightseg(row: str) -> bool:
    return row.endswith(LIGHTSEG_SUFFIX)


def base_row(row: str, root: Optional[Path] = None) -> str:
    """The row whose runs a light-seg row uses: the row its spec inherits from (same recipe, compared with the
    light-seg codebase's figure). Any other row is its own."""
    if not is_lightseg(row):
        return row
    root = root or paths.experiments_dir()
    try:
        parent = (yaml.safe_load((root / f"{row}.yaml").read_text()) or {}).get("inherit")
    except (OSError, yaml.YAMLError):
        return row  # load_spec reports a broken file with its own message
    if isinstance(parent, str) and not parent.startswith("_") and (root / f"{parent}.yaml").is_file():
        return parent
    return row


def runs_in_progress(row: str, dataset: str = "cityscapes") -> int:
    """Run folders of `row` whose run.json says the run is still going."""
    count = 0
    for run_file in sorted((paths.runs_dir() / dataset / row).glob("*/run.json")):
        try:
            status = json.loads(run_file.read_text()).get("status")
        except (OSError, json.JSONDecodeError):
            continue
        count += status == "running"
    return count


@dataclass
class RowVerdict:
    row: str
    reference: list[float]  # the table's runs for this row (the light-seg figure for a light-seg row)
    runs_of: str  # the row whose records were measured (the base row for a light-seg row)
    values: list[float] = field(default_factory=list)  # measured mIoU of each counted run, oldest first
    mean: Optional[float] = None
    std: Optional[float] = None  # sample standard deviation; None below two runs
    delta: Optional[float] = None  # mean measured - mean reference
    tolerance: float = DEFAULT_TOLERANCE
    in_progress: int = 0
    verdict: str = NOT_RUN

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def outside(self) -> bool:
        return self.verdict in OUTSIDE

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "n": self.n}


def judge(reference: list[float], values: list[float], tolerance: float = DEFAULT_TOLERANCE) -> str:
    """Reproduced when the mean is within `tolerance` of the reference mean, or inside the span of the reference's
    own runs when the table lists several; otherwise below or above."""
    if not values:
        return NOT_RUN
    mean = statistics.fmean(values)
    delta = mean - statistics.fmean(reference)
    within_spread = len(reference) > 1 and min(reference) <= mean <= max(reference)
    if abs(delta) <= tolerance + 1e-9 or within_spread:
        return REPRODUCED
    return BELOW if delta < 0 else ABOVE


def row_verdicts(specs: list[Spec], records: list[dict[str, Any]], tolerance: float = DEFAULT_TOLERANCE,
                 dataset: str = "cityscapes") -> list[RowVerdict]:
    """One verdict per spec, from the records that count (a light-seg row: its base row's)."""
    from harness.table import measured_miou

    if tolerance < 0 or not math.isfinite(tolerance):
        raise BenchError(f"--tolerance {tolerance}: give a finite number of mIoU points, 0 or more")
    by_row = {s.row: s for s in specs}
    counted: dict[str, list[float]] = {}
    for record in sorted(records, key=lambda r: (r.get("time", ""), r.get("mlflow_run_id") or "")):
        spec = by_row.get(record.get("row"))
        if spec is not None and standing(spec, record).counts:
            counted.setdefault(base_row(spec.row), []).append(measured_miou(spec, record))
    verdicts = []
    for spec in specs:
        runs_of = base_row(spec.row)
        values = counted.get(runs_of, [])
        v = RowVerdict(row=spec.row, reference=list(spec.reference.miou), runs_of=runs_of, values=values,
                       tolerance=tolerance)
        v.in_progress = runs_in_progress(runs_of, dataset) + (runs_in_progress(spec.row, dataset) if runs_of != spec.row else 0)
        if values:
            v.mean = statistics.fmean(values)
            v.std = statistics.stdev(values) if len(values) > 1 else None
            v.delta = v.mean - statistics.fmean(v.reference)
        v.verdict = judge(v.reference, values, tolerance)
        if not values and v.in_progress:
            v.verdict = IN_PROGRESS
        verdicts.append(v)
    return verdicts


# --- which runs `bench run` starts ---------------------------------------------------------------


def parse_seeds(text: str) -> list[int]:
    """`--seeds 0,1,2`: distinct integers, run in the order given."""
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise BenchError(f"--seeds {text!r}: give integers separated by commas, e.g. --seeds 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise BenchError(f"--seeds {text!r}: give distinct integers separated by commas, e.g. --seeds 0,1,2")
    return seeds


def training_row(row: str) -> tuple[str, Optional[str]]:
    """The row `bench run` trains for `row`, and a one-line note when that is another row (a light-seg row is its
    base row's recipe: the table compares the base row's runs with the light-seg figure)."""
    base = base_row(row)
    if base == row:
        return row, None
    return base, (f"note: {row} is {base}'s recipe compared with the light-seg figure; training {base} "
                  f"(the table uses its runs for both rows)")


# --- bench check ------------------------------------------------------------------------------


def check_rows(pattern: str = "*", tolerance: float = DEFAULT_TOLERANCE) -> list[RowVerdict]:
    """Verdicts of the rows matching the glob `pattern`, from the Cityscapes records."""
    import fnmatch

    from harness.results import load_records
    from harness.spec import load_all, load_ours

    specs = [s for s in load_all() + load_ours() if fnmatch.fnmatch(s.row, pattern)]
    if not specs:
        raise BenchError(f"--rows {pattern!r} matches no row; see `bench list` for the row ids")
    return row_verdicts(specs, load_records(dataset="cityscapes"), tolerance)


def check_report(verdicts: list[RowVerdict], as_json: bool = False) -> str:
    outside = [v.row for v in verdicts if v.outside]
    if as_json:
        return json.dumps({"tolerance": verdicts[0].tolerance if verdicts else DEFAULT_TOLERANCE,
                           "outside": outside, "rows": [v.to_dict() for v in verdicts]}, indent=2)
    from tabulate import tabulate

    lines = [[v.row, " | ".join(repr(x) for x in v.reference), v.n, "-" if v.mean is None else f"{v.mean:.2f}",
              "-" if v.std is None else f"{v.std:.2f}", "" if v.delta is None else f"{v.delta:+.2f}",
              v.verdict + (f" (+{v.in_progress} running)" if v.values and v.in_progress else "")
              + (f" (runs of {v.runs_of})" if v.runs_of != v.row else "")]
             for v in verdicts]
    text = tabulate(lines, headers=["row", "reference", "runs", "mean", "std", "Δ", "verdict"], disable_numparse=True)
    checked = sum(1 for v in verdicts if v.values)
    tol = verdicts[0].tolerance if verdicts else DEFAULT_TOLERANCE
    if not checked:
        summary = "no checked row has a Cityscapes reproduction yet (see `bench table --all` for every record)"
    elif outside:
        summary = (f"{len(outside)} of {checked} row(s) with results outside the tolerance ({tol:g} mIoU or the "
                   f"reference's own span): {', '.join(outside)}")
    else:
        summary = f"all {checked} row(s) with results within the tolerance ({tol:g} mIoU or the reference's own span)"
    return f"{text}\n{summary}"
