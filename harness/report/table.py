"""benchmark.md: the benchmark table's columns and reference, with what the reproductions measured beside it
(pandas + tabulate), and the figure benchmark.png (harness.report.figure).

Only records that harness.report.verdicts.standing counts reach the measured columns; every other record is listed
under its own heading. The synthetic table shows what ran (iterations, batch, crop) and no deltas.

Our rows (spec files `_table.yaml` does not list) never enter the seed table: once one of them has a record of the
dataset, they follow it under "Our rows", by the same rule; a row without a reference shows no delta and no verdict.
"""

from __future__ import annotations

import fcntl
import json
import os
import statistics
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import pandas as pd
from tabulate import tabulate

from harness.config.benchmark import DATASETS, FRAME_SIZE, OFFICIAL_SPLIT_IMAGES, REFERENCE_DATASET, SYNTHETIC_DATASET
from harness.config.plan import planned_iterations
from harness.config.spec import ALL_ROWS, Spec, load_all, load_ours, select_rows, table_title
from harness.errors import BenchError
from harness.files import write_if_changed
from harness.paths import benchmark_path, results_dir
from harness.report.records import (
    ResultRecord,
    SpeedRecord,
    TrainRecord,
    load_records,
    load_speed_records,
    record_order,
)
from harness.report.verdicts import (
    EVALUATION,
    NOT_COUNTED,
    REPRODUCTION,
    RowVerdict,
    measured_miou,
    resolve_tolerance,
    row_verdicts,
    runs_in_progress,
    standing,
    started_without_weights,
)

RANDOM_START_MARK = " (random start)"  # the run lacked its row's starting weights
FIGURE_NAME = "benchmark.png"  # written beside benchmark.md
OURS_HEADING = "Our rows"
NO_REFERENCE = "no reference"


def reference_cell(spec: Spec) -> str:
    if not spec.reference.miou:
        return "-"  # one of our rows without a reference
    cell = " \\| ".join(repr(v) for v in spec.reference.miou)
    if spec.reference.lightseg is not None:
        cell += f" (light-seg {spec.reference.lightseg!r})"
    return cell


def random_start(record: ResultRecord) -> bool:
    """A Cityscapes run lacked the starting weights its row names: not the table's experiment. (Synthetic runs
    prove the pipeline and usually have no weights; they are never reproductions anyway.)"""
    return (isinstance(record, TrainRecord) and record.dataset != SYNTHETIC_DATASET
            and started_without_weights(record))


def _fmt(value: Optional[float], spec: str = ".2f", empty: str = "-") -> str:
    return empty if value is None else format(value, spec)


def _runs_cell(v: RowVerdict) -> str:
    if not v.values:
        return "-"
    cell = " \\| ".join(f"{x:.2f}" for x in v.values)
    return cell + (f" (runs of {v.runs_of})" if v.runs_of != v.row else "")


def _verdict_cell(v: RowVerdict) -> str:
    return v.verdict + (f" (+{v.in_progress} running)" if v.values and v.in_progress else "")


INFER_SIZE = list(FRAME_SIZE)  # the Cityscapes frame: the inference column's unit of work, one image at a time
INFER_COLUMN = f"infer img/s ({FRAME_SIZE[0]}x{FRAME_SIZE[1]})"
NOT_MEASURED = "not measured"
INFER_COMMAND = "bench speed --row {row} --mode infer --size " + f"{FRAME_SIZE[0]},{FRAME_SIZE[1]}"


def infer_speeds(speed_records: list[SpeedRecord]) -> dict[str, tuple[float, str, str]]:
    """Per row: (img/s, device, precision) of its whole-image forward at 2048x1024, batch 1, from `bench speed`
    records; a GPU's figure before a CPU's, and the newest of those."""
    best: dict[str, tuple[tuple, tuple[float, str, str]]] = {}
    for record in speed_records:
        entry = record.modes.get("infer")
        if not entry or entry["size"] != INFER_SIZE or entry["batch"] != 1:
            continue
        rank = (record.device_type == "cuda", record.time)
        if record.row not in best or rank > best[record.row][0]:
            best[record.row] = (rank, (entry["images_per_s"], record.device, record.precision))
    return {row: figures for row, (_, figures) in best.items()}


def unusable_speeds(speed_records: list[SpeedRecord]) -> dict[str, str]:
    """Per row with `bench speed` records none of which the column can show: why, from the newest of them (e.g.
    a CPU run, which times small images unless given --size 2048,1024)."""
    why: dict[str, tuple[str, str]] = {}
    for record in speed_records:
        entry = record.modes.get("infer")
        if entry and entry["size"] == INFER_SIZE and entry["batch"] == 1:
            continue
        if not entry:
            reason = f"its record on {record.device} has no infer mode"
        else:
            size = "x".join(map(str, entry["size"]))
            reason = f"its record on {record.device} timed {size}, batch {entry['batch']}"
        if record.row not in why or record.time > why[record.row][0]:
            why[record.row] = (record.time, reason)
    return {row: reason for row, (_, reason) in why.items()}


def _infer_cell(spec: Spec, v: RowVerdict, speeds: dict[str, tuple[float, str, str]],
                unusable: Optional[dict[str, str]] = None) -> str:
    figures = speeds.get(spec.row) or speeds.get(v.runs_of)  # a light-seg row is its base row's network
    if figures is None:
        reason = (unusable or {}).get(spec.row) or (unusable or {}).get(v.runs_of)
        return f"{NOT_MEASURED} ({reason}; `{INFER_COMMAND.format(row=v.runs_of)}`)" if reason else NOT_MEASURED
    images_per_s, device, precision = figures
    return f"{images_per_s:.1f} ({device}, {precision})"


def verdict_frame(specs: list[Spec], verdicts: list[RowVerdict],
                  speed_records: Optional[list[SpeedRecord]] = None) -> pd.DataFrame:
    speed_records = speed_records if speed_records is not None else load_speed_records()
    speeds, unusable = infer_speeds(speed_records), unusable_speeds(speed_records)
    rows = []
    for spec, v in zip(specs, verdicts):
        c = spec.columns
        rows.append({
            "row": spec.row,
            "model": c.model,
            "backbone": c.backbone,
            "ema": "yes" if c.ema else "no",
            "crop test": "-" if c.crop_test is None else str(c.crop_test),
            "bs": str(c.batch_size),
            "epoch": str(c.epochs),
            "general test size": str(c.test_size),
            "reference mIoU": reference_cell(spec),
            "runs": str(v.n),
            "measured mIoU (runs)": _runs_cell(v),
            "mean": _fmt(v.mean),
            "std": _fmt(v.std),
            "Δ": _fmt(v.delta, "+.2f", ""),
            "verdict": _verdict_cell(v),
            INFER_COLUMN: _infer_cell(spec, v, speeds, unusable),
        })
    return pd.DataFrame(rows)


def our_verdicts(specs: list[Spec], records: list[ResultRecord], tolerance: Optional[float] = None,
                 dataset: str = REFERENCE_DATASET) -> list[RowVerdict]:
    """Verdicts of our rows: against their own reference when they give one, else the counted runs, mean and std
    with no delta and the verdict "no reference"."""
    referenced = [s for s in specs if s.reference.miou]
    judged = dict(zip((s.row for s in referenced), row_verdicts(referenced, records, tolerance, dataset)))
    verdicts = []
    for spec in specs:
        if spec.row in judged:
            verdicts.append(judged[spec.row])
            continue
        values = [measured_miou(spec, r) for r in _train_records(records)
                  if r.row == spec.row and standing(spec, r).counts]
        v = RowVerdict(row=spec.row, reference=[], runs_of=spec.row, values=values,
                       tolerance=resolve_tolerance(tolerance),
                       in_progress=runs_in_progress(spec.row, dataset), verdict=NO_REFERENCE)
        if values:
            v.mean = statistics.fmean(values)
            v.std = statistics.stdev(values) if len(values) > 1 else None
        verdicts.append(v)
    return verdicts


def _train_records(records: list[ResultRecord]) -> list[TrainRecord]:
    # Training runs only: `bench eval` of a run's own checkpoint would count that run twice.
    return sorted((r for r in records if isinstance(r, TrainRecord)), key=record_order)


def synthetic_frame(specs: list[Spec], records: list[ResultRecord]) -> pd.DataFrame:
    """What ran, one line per row and budget (iterations, batch, crop): runs of different budgets never average."""
    groups: dict[tuple, list[float]] = {}
    order = {s.row: i for i, s in enumerate(specs)}
    by_row = {s.row: s for s in specs}
    for r in _train_records(records):
        if r.row in by_row:
            crop = r.crop_size
            key = (order[r.row], r.row, r.iterations, r.batch_size, tuple(crop) if crop else None)
            groups.setdefault(key, []).append(measured_miou(by_row[r.row], r))
    rows = []
    for (_, row, iterations, batch, crop), values in sorted(groups.items(), key=lambda kv: kv[0][:3]):
        c = by_row[row].columns
        rows.append({
            "row": row, "model": c.model, "ema": "yes" if c.ema else "no",
            "iterations": str(iterations), "batch": str(batch), "crop": str(list(crop)) if crop else "-",
            "runs": str(len(values)),
            "measured mIoU (runs)": " \\| ".join(f"{x:.2f}" for x in values),
            "mean": f"{statistics.fmean(values):.2f}",
            "std": _fmt(statistics.stdev(values) if len(values) > 1 else None),
        })
    columns = ["row", "model", "ema", "iterations", "batch", "crop", "runs", "measured mIoU (runs)", "mean", "std"]
    return pd.DataFrame(rows, columns=columns)


def table_frame(specs: list[Spec], records: list[ResultRecord], dataset: Optional[str] = None,
                tolerance: Optional[float] = None) -> pd.DataFrame:
    """The table of `dataset` (default: the records' own, when they are all synthetic; else Cityscapes)."""
    if dataset is None:
        every_synthetic = bool(records) and all(r.dataset == SYNTHETIC_DATASET for r in records)
        dataset = SYNTHETIC_DATASET if every_synthetic else REFERENCE_DATASET
    if dataset == SYNTHETIC_DATASET:
        return synthetic_frame(specs, records)
    return verdict_frame(specs, row_verdicts(specs, records, tolerance))


def records_frame(specs: list[Spec], records: list[ResultRecord],
                  kinds: Optional[tuple[str, ...]] = None) -> pd.DataFrame:
    """Records with their standing, grouped by kind (in `kinds` order) and table order; every record if kinds is
    None."""
    by_row = {s.row: s for s in specs}
    order = {s.row: i for i, s in enumerate(specs)}
    all_kinds = (REPRODUCTION, *NOT_COUNTED, EVALUATION)
    listed = []
    for r in sorted(records, key=record_order):
        spec = by_row.get(r.row)
        if spec is None:
            continue
        s = standing(spec, r)
        if kinds is None or s.kind in kinds:
            listed.append((all_kinds.index(s.kind), order[spec.row], spec, r, s))
    rows = []
    for _, _, spec, r, s in sorted(listed, key=lambda item: item[:2]):
        planned = planned_iterations(spec) if r.dataset == REFERENCE_DATASET else None
        iterations, images, seed = _training_cells(r)
        rows.append({
            "kind": s.kind, "row": spec.row,
            "mIoU": _fmt(_listed_miou(spec, r)) + (RANDOM_START_MARK if random_start(r) else ""),
            "iterations": iterations + (f" of {planned}" if planned and isinstance(r, TrainRecord) else ""),
            "train / val images": images, "seed": seed, "time": r.time,
            "why it does not count": s.reason or "-",
            "record": _file_name(r),
        })
    columns = ["kind", "row", "mIoU", "iterations", "train / val images", "seed", "time", "why it does not count",
               "record"]
    return pd.DataFrame(rows, columns=columns)


def _listed_miou(spec: Optional[Spec], record: ResultRecord) -> float:
    """A listed record's mIoU: a training run's headline (the row's statistic; without the row's spec, the one it
    recorded), an evaluation's figure."""
    return measured_miou(spec, record) if spec is not None and isinstance(record, TrainRecord) else record.miou


def _training_cells(record: ResultRecord) -> tuple[str, str, str]:
    """The iterations, "train / val images" and seed cells of a listed record: an evaluation trained nothing."""
    if isinstance(record, TrainRecord):
        return str(record.iterations), f"{record.train_images} / {record.val_images}", str(record.seed)
    return "-", "? / ?", "-"


def _file_name(record: ResultRecord) -> str:
    return Path(record.path).name if record.path else "-"


UNKNOWN_ROW = "unknown row"


def every_record_frame(specs: list[Spec], records: list[ResultRecord]) -> pd.DataFrame:
    """Every record of every dataset, table rows and ours, with its kind and why it does or does not count; a
    record of a row no spec defines any more is listed too."""
    by_row = {s.row: s for s in specs}
    order = {s.row: i for i, s in enumerate(specs)}
    rows = []
    for r in sorted(records, key=lambda r: (r.dataset, order.get(r.row, len(order)), r.time)):
        spec = by_row.get(r.row)
        if spec is None:
            kind, why = UNKNOWN_ROW, f"no spec experiments/{r.row}.yaml defines its row"
        else:
            s = standing(spec, r)
            kind, why = s.kind, s.reason or "counts: the full budget on the official split from the row's weights"
        iterations, images, seed = _training_cells(r)
        rows.append({
            "dataset": r.dataset, "kind": kind, "row": r.row, "mIoU": _fmt(_listed_miou(spec, r)),
            "iterations": iterations, "train / val images": images, "seed": seed, "time": r.time,
            "why it does or does not count": why, "record": _file_name(r),
        })
    columns = ["dataset", "kind", "row", "mIoU", "iterations", "train / val images", "seed", "time",
               "why it does or does not count", "record"]
    return pd.DataFrame(rows, columns=columns)


def render_every_record() -> str:
    """`bench table --all`: every record under results/ (speed records aside), whatever its dataset."""
    specs = select_rows(ALL_ROWS)
    by_row = {s.row: s for s in specs}
    records = load_records()
    counted = sum(1 for r in records if r.row in by_row and standing(by_row[r.row], r).counts)
    text = (f"# Every record under {results_dir()}\n\n{len(records)} record(s), {counted} of them counted in "
            "benchmark.md (a Cityscapes reproduction: the row's full budget on the official split, from its "
            "starting weights); every other record, synthetic runs included, says why it does not count.\n")
    if records:
        text += f"\n{_markdown(every_record_frame(specs, records))}\n"
    return text


def _markdown(frame: pd.DataFrame) -> str:
    return tabulate(frame, headers="keys", tablefmt="github", showindex=False, disable_numparse=True)


PROSE_WIDTH = 118  # the table's prose wraps here (one paragraph still, as markdown renders it); tables cannot


def wrap(paragraph: str) -> str:
    """A paragraph of prose as lines a terminal or a diff shows whole (words and code spans never split inside)."""
    return textwrap.fill(paragraph, PROSE_WIDTH, break_long_words=False, break_on_hyphens=False)


def render(dataset: str = REFERENCE_DATASET, specs: Optional[list[Spec]] = None,
           records: Optional[list[ResultRecord]] = None, tolerance: Optional[float] = None,
           all_records: bool = False, figure: Optional[str] = FIGURE_NAME, ours: Optional[list[Spec]] = None) -> str:
    """The markdown of `dataset`'s table; with `all_records`, every record of the dataset is listed with its kind.
    `ours` (default: our rows from experiments/ when `specs` is not given, else none) follow under "Our rows"."""
    if dataset not in DATASETS:
        raise BenchError(f"unknown dataset '{dataset}'; use one of {', '.join(DATASETS)}")
    tolerance = resolve_tolerance(tolerance)
    if ours is None:
        ours = load_ours() if specs is None else []
    specs = specs if specs is not None else load_all()
    records = records if records is not None else load_records(dataset=dataset)
    mine = {s.row for s in ours}
    our_records = [r for r in records if r.dataset == dataset and r.row in mine]
    known = {s.row for s in specs}
    records = [r for r in records if r.dataset == dataset and r.row in known]
    header = (f"# {table_title()}\n\n"
              f"Generated by `bench table` from `experiments/` and `results/` (dataset: {dataset}); do not edit by "
              "hand.\n")
    if dataset == SYNTHETIC_DATASET:
        note = ("SYNTHETIC DATA: these runs prove the pipeline works; they are not reproductions of the table. "
                "One line per row and budget actually run (iterations, global batch, crop); no reference, no Δ.")
        text = f"{header}{wrap(note)}\n\n{_markdown(synthetic_frame(specs, records))}\n"
    else:
        note = (
            f"A run counts only if it trained its row's full planned budget (the table's epochs over the "
            f"{OFFICIAL_SPLIT_IMAGES['train']} train images) on Cityscapes with the official val split "
            f"({OFFICIAL_SPLIT_IMAGES['val']} images) and "
            "from the row's expected starting weights; other runs are listed below, never in the measured columns. "
            "mIoU is measured on the val split in each row's test mode (the whole image at the general test size, "
            "sliding-window crops where the row sets crop test); each run reports the best of its evaluations every "
            "5 epochs, as United-Perception's auto_save_best did (records keep the final figure too); EMA rows are "
            "measured with their EMA weights. A light-seg row is its base row's recipe: it shows the base row's "
            "runs against the light-seg figure. std is the sample standard deviation over runs; "
            "Δ = mean measured − mean reference; verdict: reproduced when |Δ| ≤ "
            f"{tolerance:g} mIoU or the mean lies within the span of the reference's own runs, else below or "
            "above; in progress when a run of the row is still going. "
            f"{INFER_COLUMN}: the whole-image forward at 2048x1024, one image at a time, from `bench speed` records "
            f"(results/speed/), with the device and precision it ran on; \"{NOT_MEASURED}\" where no record exists."
        )
        text = f"{header}{wrap(note)}\n\n{_markdown(table_frame(specs, records, 'cityscapes', tolerance))}\n"
        if figure:
            text += f"\n![measured vs reference per row, and mIoU against GFLOPs]({figure})\n"
        if not all_records:
            others = records_frame(specs, records, NOT_COUNTED)
            if len(others):
                text += ("\n## Runs that do not count\n\nKept for the record, grouped by why: other data (not the "
                         "official split), smoke (under one epoch), partial (another budget), random start (without "
                         "the row's starting weights).\n")
                for kind in NOT_COUNTED:
                    part = others[others["kind"] == kind].drop(columns="kind")
                    if len(part):
                        text += f"\n### {kind}\n\n{_markdown(part)}\n"
    if all_records:
        text += f"\n## Every record ({dataset})\n\n{_markdown(records_frame(specs, records))}\n"
    if our_records:
        text += _ours_section(dataset, ours, our_records, tolerance, all_records)
    return text


def _ours_section(dataset: str, ours: list[Spec], records: list[ResultRecord], tolerance: float,
                  all_records: bool) -> str:
    """Our rows, apart from the seed table: the same frames and rule as the table's rows."""
    text = (f"\n## {OURS_HEADING}\n\nRows added beside the benchmark table (spec files `experiments/_table.yaml` does "
            "not list), never mixed into it; a row without a reference has no Δ and no verdict.\n\n")
    if dataset == SYNTHETIC_DATASET:
        return text + f"{_markdown(synthetic_frame(ours, records))}\n"
    frame = verdict_frame(ours, our_verdicts(ours, records, tolerance))
    text += f"{_markdown(frame)}\n"
    listed = records_frame(ours, records, None if all_records else NOT_COUNTED)
    if len(listed):
        what = "every record" if all_records else "runs that do not count"
        text += f"\n### {OURS_HEADING}: {what}\n\n{_markdown(listed)}\n"
    return text


def write_benchmark(path: Optional[Path] = None, tolerance: Optional[float] = None, *,
                    after_record: bool = False) -> Path:
    """Regenerate benchmark.md (Cityscapes results only) and its figure; unchanged inputs give byte-identical files.

    Every finishing run calls this, so several may at once: the records are read and both files written under one
    lock beside them (each file through a temporary file of its own), so the last writer renders every record
    written before it, and no reader sees a part. A run that has just written its record (`after_record`) first
    takes a ticket under the lock; it skips rendering when a rendering that started after its ticket was taken has
    already been written, since that one read its record: runs finishing together render once or twice, not once
    each."""
    from harness.report.figure import write_figure

    path = path or benchmark_path()
    lock = path.with_name(f".{path.name}.lock")
    ticket = None
    if after_record:
        with exclusive_lock(lock) as counters:
            ticket = counters["registered"] = counters.get("registered", 0) + 1
    with exclusive_lock(lock) as counters:
        rendered = path.is_file() and path.with_name(FIGURE_NAME).is_file()
        if ticket is not None and rendered and counters.get("rendered", 0) >= ticket:
            return path
        counters["rendered"] = counters.get("registered", 0)  # every ticket so far: their records are on disk
        specs, ours = load_all(), load_ours()
        all_records = load_records(dataset=REFERENCE_DATASET)
        records = [r for r in all_records if r.row in {s.row for s in specs}]
        write_if_changed(path, render(REFERENCE_DATASET, specs, all_records, tolerance=tolerance, ours=ours).encode())
        write_figure(path.with_name(FIGURE_NAME), specs, row_verdicts(specs, records, tolerance))
    return path


@contextmanager
def exclusive_lock(lock_path: Path) -> Iterator[dict[str, int]]:
    """An advisory lock (flock) on `lock_path`, held for the block; works across processes on one filesystem. The
    block gets the counters the lock file keeps (tickets taken, tickets rendered), saved when it ends without an
    exception; an unreadable file counts as none taken, which only ever costs an extra rendering."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with os.fdopen(os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644), "r+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            try:
                counters = {k: int(v) for k, v in json.loads(handle.read() or "{}").items()}
            except (ValueError, TypeError, AttributeError):
                counters = {}
            before = dict(counters)
            yield counters
            if counters != before:
                handle.seek(0)
                handle.truncate()
                handle.write(json.dumps(counters, sort_keys=True))
                handle.flush()
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
