"""Which records count as reproductions, and each row's verdict against the table's reference.

One rule decides whether a result record is a reproduction (`standing`): the row's full planned budget,
on Cityscapes with the official split sizes, from the row's expected starting weights. Everything else is
kept and shown apart, never averaged into the measured column.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from harness import paths
from harness.config.benchmark import OFFICIAL_SPLIT_IMAGES, REFERENCE_DATASET
from harness.config.plan import planned_iterations
from harness.config.spec import Spec, base_row, select_rows, table_tolerance
from harness.config.starting_weights import MISSING, OTHER
from harness.engine.run_folder import RUN_STATUS, RunFolder
from harness.errors import BenchError
from harness.report.records import ResultRecord, TrainRecord, load_records, record_order

OFFICIAL_TRAIN_IMAGES = OFFICIAL_SPLIT_IMAGES["train"]
OFFICIAL_VAL_IMAGES = OFFICIAL_SPLIT_IMAGES["val"]

# Kinds of record, in the order benchmark.md lists the ones that do not count.
REPRODUCTION = "reproduction"
OTHER_DATA = "other data"
SMOKE = "smoke"
PARTIAL = "partial"
RANDOM_START = "random start"
OTHER_WEIGHTS = "other starting weights"
EVALUATION = "evaluation"
NOT_COUNTED = (OTHER_DATA, SMOKE, PARTIAL, RANDOM_START, OTHER_WEIGHTS)

# Verdicts
REPRODUCED = "reproduced"
BELOW = "below"
ABOVE = "above"
NOT_RUN = "not run"
IN_PROGRESS = "in progress"
NO_REFERENCE = "no reference"  # one of our rows, which the table does not list: measured, not judged
OUTSIDE = (BELOW, ABOVE)


def headline_miou(spec: Spec, best: float, ema_best: Optional[float], ema_final: Optional[float]) -> float:
    """The row's statistic, as UP reported it: the best of its evaluations every 5 epochs (auto_save_best), of the
    EMA weights for an EMA row (their final evaluation if none was kept as best) and of the raw weights otherwise
    (also for a run that holds no EMA figure, as its record's `miou_weights` then says)."""
    if spec.columns.ema:
        ema = ema_best if ema_best is not None else ema_final
        if ema is not None:
            return ema
    return best


def measured_miou(spec: Spec, record: TrainRecord) -> float:
    """A training record's headline (`headline_miou`)."""
    return headline_miou(spec, record.miou_best, record.miou_ema_best, record.miou_ema)


@dataclass(frozen=True)
class Standing:
    kind: str  # REPRODUCTION or one of NOT_COUNTED (or EVALUATION for `bench eval` records)
    reason: str  # one line: why it does not count ("" for a reproduction)

    @property
    def counts(self) -> bool:
        return self.kind == REPRODUCTION


def started_without_weights(record: TrainRecord) -> bool:
    """The run lacked the starting weights its row names and trained from random weights instead."""
    return record.starting_weights.startswith(MISSING)


def standing(spec: Spec, record: ResultRecord) -> Standing:
    """The one rule: a record is a reproduction of `spec`'s row only if it trained the full planned budget on
    Cityscapes with the official split (500 val images), from the row's expected starting weights.

    The first failing condition names the kind: other data (not the official split), smoke (less than one epoch of
    the plan), partial (another number of iterations), random start, other starting weights (a file of the expected
    name whose checksum is not the published one)."""
    if not isinstance(record, TrainRecord):
        return Standing(EVALUATION, "an evaluation of a checkpoint, not a training run")
    if record.dataset != REFERENCE_DATASET:
        return Standing(OTHER_DATA, f"dataset {record.dataset!r}, not Cityscapes")
    val, train = record.val_images, record.train_images
    if val != OFFICIAL_VAL_IMAGES or train != OFFICIAL_TRAIN_IMAGES:
        return Standing(OTHER_DATA, f"{train} train / {val} val images, not the official "
                                    f"{OFFICIAL_TRAIN_IMAGES} / {OFFICIAL_VAL_IMAGES}")
    planned, done = planned_iterations(spec), record.iterations
    if done != planned:
        one_epoch = planned // spec.columns.epochs
        kind = SMOKE if done < one_epoch else PARTIAL
        return Standing(kind, f"{done} of the {planned} planned iterations")
    weights = record.starting_weights
    if started_without_weights(record):
        return Standing(RANDOM_START, f"started without the row's weights ({weights})")
    if weights.startswith(f"{OTHER} "):
        return Standing(OTHER_WEIGHTS, f"started from another file than the published one "
                                       f"({weights[len(OTHER) + 1:]})")
    return Standing(REPRODUCTION, "")


def runs_in_progress(row: str, dataset: str = REFERENCE_DATASET) -> int:
    """Run folders of `row` whose run.json says the run is still going."""
    count = 0
    for path in sorted((paths.runs_dir() / dataset / row).glob("*/")):
        if RunFolder.is_run_folder(path):
            try:
                count += RunFolder.open(path).info.get("status") == RUN_STATUS["RUNNING"]
            except BenchError:
                continue
    return count


@dataclass
class RowVerdict:
    row: str
    reference: list[float]  # the table's runs for this row (the light-seg figure for a light-seg row)
    runs_of: str  # the row whose records were measured (the base row for a light-seg row)
    tolerance: float  # mIoU points (harness.config.spec.table_tolerance)
    values: list[float] = field(default_factory=list)  # measured mIoU of each counted run, oldest first
    mean: Optional[float] = None
    std: Optional[float] = None  # sample standard deviation; None below two runs
    delta: Optional[float] = None  # mean measured - mean reference
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


def judge(reference: list[float], values: list[float], tolerance: float) -> str:
    """Reproduced when the mean is within `tolerance` of the reference mean, or inside the span of the reference's
    own runs when the table lists several; otherwise below or above."""
    if not values:
        return NOT_RUN
    if not reference:
        return NO_REFERENCE
    mean = statistics.fmean(values)
    delta = mean - statistics.fmean(reference)
    within_spread = len(reference) > 1 and min(reference) <= mean <= max(reference)
    if abs(delta) <= tolerance + 1e-9 or within_spread:
        return REPRODUCED
    return BELOW if delta < 0 else ABOVE


def resolve_tolerance(tolerance: Optional[float]) -> float:
    """`--tolerance`, or the table's own (`_table.yaml`)."""
    if tolerance is None:
        return table_tolerance()
    if tolerance < 0 or not math.isfinite(tolerance):
        raise BenchError(f"--tolerance {tolerance}: give a finite number of mIoU points, 0 or more")
    return tolerance


def row_verdicts(specs: list[Spec], records: Sequence[ResultRecord], tolerance: Optional[float] = None,
                 dataset: str = REFERENCE_DATASET) -> list[RowVerdict]:
    """One verdict per spec, from the records that count (a light-seg row: its base row's)."""
    tolerance = resolve_tolerance(tolerance)
    by_row = {s.row: s for s in specs}
    counted: dict[str, list[float]] = {}
    for record in sorted(records, key=record_order):
        spec = by_row.get(record.row)
        if spec is not None and isinstance(record, TrainRecord) and standing(spec, record).counts:
            counted.setdefault(base_row(spec.row), []).append(measured_miou(spec, record))
    verdicts = []
    for spec in specs:
        runs_of = base_row(spec.row)
        values = counted.get(runs_of, [])
        v = RowVerdict(row=spec.row, reference=list(spec.reference.miou), runs_of=runs_of, values=values,
                       tolerance=tolerance)
        v.in_progress = runs_in_progress(runs_of, dataset)
        if runs_of != spec.row:
            v.in_progress += runs_in_progress(spec.row, dataset)
        if values:
            v.mean = statistics.fmean(values)
            v.std = statistics.stdev(values) if len(values) > 1 else None
            v.delta = v.mean - statistics.fmean(v.reference) if v.reference else None
        v.verdict = judge(v.reference, values, tolerance)
        if not values and v.in_progress:
            v.verdict = IN_PROGRESS
        verdicts.append(v)
    return verdicts


# --- bench check ------------------------------------------------------------------------------


def check_rows(pattern: str = "*", tolerance: Optional[float] = None) -> list[RowVerdict]:
    """Verdicts of the rows matching the glob `pattern`, from the Cityscapes records."""
    return row_verdicts(select_rows(pattern), load_records(dataset=REFERENCE_DATASET), tolerance)


def check_report(verdicts: list[RowVerdict], as_json: bool = False) -> str:
    outside = [v.row for v in verdicts if v.outside]
    if as_json:
        return json.dumps({"tolerance": verdicts[0].tolerance if verdicts else table_tolerance(),
                           "outside": outside, "rows": [v.to_dict() for v in verdicts]}, indent=2)
    from tabulate import tabulate

    lines = [[v.row, " | ".join(repr(x) for x in v.reference), v.n, "-" if v.mean is None else f"{v.mean:.2f}",
              "-" if v.std is None else f"{v.std:.2f}", "" if v.delta is None else f"{v.delta:+.2f}",
              v.verdict + (f" (+{v.in_progress} running)" if v.values and v.in_progress else "")
              + (f" (runs of {v.runs_of})" if v.runs_of != v.row else "")]
             for v in verdicts]
    text = tabulate(lines, headers=["row", "reference", "runs", "mean", "std", "Δ", "verdict"], disable_numparse=True)
    checked = sum(1 for v in verdicts if v.values and v.reference)  # our own rows are measured, not judged
    tol = verdicts[0].tolerance if verdicts else table_tolerance()
    if not checked:
        summary = "no checked row has a Cityscapes reproduction yet (see `bench table --all` for every record)"
    elif outside:
        summary = (f"{len(outside)} of {checked} row(s) with results outside the tolerance ({tol:g} mIoU or the "
                   f"reference's own span): {', '.join(outside)}")
    else:
        summary = f"all {checked} row(s) with results within the tolerance ({tol:g} mIoU or the reference's own span)"
    return f"{text}\n{summary}"
