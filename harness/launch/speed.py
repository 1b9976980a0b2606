"""`bench speed` as a whole: the measurements of harness.engine.benchmark for one row or many, onnxruntime beside
PyTorch, the record under results/speed/<device>/ and the table printed from it."""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from harness.config.benchmark import OFFICIAL_SPLIT_IMAGES, REFERENCE_DATASET
from harness.config.plan import make_plan
from harness.config.precision import resolve_compute
from harness.config.spec import Spec, load_spec
from harness.cores import loader_workers
from harness.engine.benchmark import (
    MODES,
    Bench,
    SpeedOptions,
    Timing,
    check_speed_options,
    defaults,
    measure_modes,
    resolve_sizes,
    timing_fields,
)
from harness.engine.device import device_memory_gib, device_name, matmul_peak_tflops, pick_device
from harness.engine.distributed import World
from harness.errors import BenchError
from harness.models import check_implemented
from harness.outputs.model_export import onnx_input_size, onnx_metadata, onnx_session, time_onnx
from harness.report.records import SpeedRecord, git_commit, package_versions, utc_now, write_speed_record


def speed(options: SpeedOptions) -> SpeedRecord:
    """Measure the requested modes, write the record under results/speed/<device>/ (a CPU's under runs/speed/, out
    of git and of benchmark.md's inference column, unless `keep_record`), return it."""
    check_speed_options(options)
    spec = load_spec(options.row)
    modes = MODES if options.mode == "all" else (options.mode,)
    if {"train", "infer"} & set(modes):
        check_implemented(spec)
    device = pick_device(options.device, World())
    compute = resolve_compute(device.type, options.precision, options.channels_last, options.fused)
    precision = compute.precision
    # The epoch length (the official train split) changes no timing.
    plan = make_plan(spec, REFERENCE_DATASET, OFFICIAL_SPLIT_IMAGES["train"], precision=precision,
                     machine_workers=loader_workers(1))
    counts = {**defaults(device), **{k: getattr(options, k) for k in ("warmup", "repeats", "steps")
                                     if getattr(options, k) is not None}}
    peak, peak_dtype = matmul_peak_tflops(device) if {"train", "infer"} & set(modes) else (None, None)
    bench = Bench(options, spec, plan, device, counts, peak, compute)
    session = onnx_beside(options, device) if options.onnx else None
    sizes = resolve_sizes(spec, plan, device, options.size if session is None else onnx_input_size(session))
    results = measure_modes(bench, ("infer",) if session is not None else modes, sizes)
    if session is not None:
        results["infer onnxruntime"] = measure_onnx(session, results["infer"], counts)
    return write_speed_record(SpeedRecord(
        row=spec.row, device=device_name(device), device_type=device.type,
        device_memory_gib=device_memory_gib(device), precision=precision, compile=options.compile,
        channels_last=compute.channels_last, fused=compute.fused, cpu_threads=torch.get_num_threads(),
        matmul_peak_tflops=peak,
        matmul_peak_dtype=peak_dtype, warmup=counts["warmup"], repeats=counts["repeats"], steps=counts["steps"],
        modes=results, git_commit=git_commit(), versions=package_versions(), time=utc_now()),
        kept=device.type != "cpu" or options.keep_record)  # a CPU's figures are this machine's, not the table's


def onnx_beside(options: SpeedOptions, device: torch.device) -> Any:
    """The onnxruntime session of `--onnx FILE` (of the row timed: its metadata names the row it was exported from),
    with PyTorch's thread count on the CPU."""
    path = Path(options.onnx or "")
    if not path.is_file():
        raise BenchError(f"--onnx {path}: no such file; write one with `bench export --format onnx`")
    exported = onnx_metadata(path).get("segbench.row")
    if exported and exported != options.row:
        raise BenchError(f"--onnx {path} was exported from {exported}, not {options.row}; pass --row {exported}")
    return onnx_session(path, threads=torch.get_num_threads(), device=device.type)


def measure_onnx(session: Any, pytorch: dict[str, Any], counts: dict[str, int]) -> dict[str, Any]:
    """onnxruntime's inference at the ONNX file's size and PyTorch's batch, fp32 as exported."""
    times = time_onnx(session, pytorch["batch"], **counts)
    timing = Timing(pytorch["batch"], statistics.median(times), times, None)
    return {"size": pytorch["size"], **timing_fields(timing), "providers": session.get_providers(),
            "vs_pytorch": timing.images_per_s / pytorch["images_per_s"]}


def select_rows(pattern: str) -> list[Spec]:
    """The rows the globs name (`all`: every row); a light-seg row is its base row's network and recipe, measured
    once under the base row's name."""
    from harness.config.spec import select_rows as select

    return select(pattern, training=True)


@dataclass
class RowsOutcome:
    records: list[SpeedRecord]
    not_reached: list[str]  # rows not started: the budget would have been exceeded
    elapsed_s: float
    budget_s: Optional[float]


def speed_rows(pattern: str, options: SpeedOptions, budget_s: Optional[float] = None,
               echo: Callable[[str], None] = print, clock: Callable[[], float] = time.perf_counter) -> RowsOutcome:
    """Measure several rows one after another, each as `speed` does (a record each). With `budget_s`, a row is not
    started when the time spent plus the mean time of the rows measured so far would pass the budget: one short
    lease of a GPU yields what fits, and the rest is named."""
    if budget_s is not None and not (math.isfinite(budget_s) and budget_s > 0):  # nan compares false to anything
        raise BenchError(f"--budget-s {budget_s}: give a positive, finite number of seconds (e.g. --budget-s 600)")
    specs = select_rows(pattern)
    check_speed_options(options)
    began = now = clock()
    durations: list[float] = []
    records: list[SpeedRecord] = []
    for index, spec in enumerate(specs):
        if budget_s is not None and durations and now - began + statistics.fmean(durations) > budget_s:
            return RowsOutcome(records, [s.row for s in specs[index:]], now - began, budget_s)
        record = speed(dataclasses.replace(options, row=spec.row))
        finished = clock()
        durations.append(finished - now)
        now = finished
        records.append(record)
        echo(render(record))
    return RowsOutcome(records, [], now - began, budget_s)


def measure(options: SpeedOptions, rows_pattern: Optional[str], budget_s: Optional[float],
            echo: Callable[[str], None] = print) -> None:
    """`bench speed`: `options.row`'s record table, or every row `rows_pattern` names one after another (within
    `budget_s`), echoed."""
    if bool(options.row) == (rows_pattern is not None):
        raise BenchError("bench speed needs --row ROW or --rows GLOB (e.g. --rows 'df_seg*' or --rows all), not both")
    if budget_s is not None and rows_pattern is None:
        raise BenchError("--budget-s limits a --rows measurement; give --rows GLOB (or drop --budget-s)")
    if rows_pattern is None:
        echo(render(speed(options)))
        return
    echo(rows_summary(speed_rows(rows_pattern, options, budget_s, echo=echo)))


def rows_summary(outcome: RowsOutcome) -> str:
    line = f"measured {len(outcome.records)} row(s) in {outcome.elapsed_s:.0f} s"
    if outcome.not_reached:
        line += (f"; not reached within --budget-s {outcome.budget_s:g} ({len(outcome.not_reached)}): "
                 + ", ".join(outcome.not_reached))
    return line


COLUMNS = ["row", "mode", "device", "precision", "batch", "size", "img/s", "step ms", "peak mem GiB", "GFLOPs/img",
           "TFLOP/s", "MFU %", "plain fp32 NCHW img/s", "x plain", "notes"]


def mode_notes(mode: str, entry: dict[str, Any], device_type: str) -> str:
    """What a mode's figures mean beyond the columns: per worker, the share of the forward rate, where it ran."""
    if mode.startswith("data"):
        per_worker = entry.get("images_per_s_per_worker")
        decoder, floor = entry.get("decoder"), entry.get("decode_floor_images_per_s")
        what = (f"decoding PNGs with {decoder}" if decoder else "reading decoded frames (--decoded-cache)")
        if floor:  # the decoder's single-core rate: what a worker could reach if decoding were all it did
            what += f" (one core decodes {floor:.1f} img/s"
            what += f": {100 * per_worker / floor:.0f}% of it)" if per_worker else ")"
        return (f"{per_worker:.1f} img/s per worker" if per_worker else "in the main process") + f", {what}"
    if mode == "augment":
        return f"on {device_type}, from {'x'.join(map(str, entry['source_size']))} frames"
    if mode == "infer onnxruntime":
        return f"{entry['providers'][0]}, fp32; {entry['vs_pytorch']:.2f} x PyTorch's infer"
    if mode == "eval":
        share = entry.get("fraction_of_forward")
        shown = f"{100 * share:.0f}% of infer" if share is not None else "infer not timed alike"
        return f"{shown}, {entry['workers']} workers"
    return "-"


def table_rows(record: SpeedRecord) -> list[list[str]]:
    def fmt(value: Optional[float], spec: str) -> str:
        return "-" if value is None else format(value, spec)

    rows = []
    for mode, entry in record.modes.items():
        plain = entry.get("plain_fp32_nchw") or {}
        rows.append([
            record.row, mode + (f" ({entry['workers']} workers)" if mode.startswith("data") else ""),
            record.device,
            record.precision if not mode.startswith("data") and mode != "augment" else "-", str(entry["batch"]),
            "x".join(map(str, entry["size"])),
            fmt(entry["images_per_s"], ".2f"), fmt(1000 * entry["step_s"], ".1f"), fmt(entry["peak_memory_gib"], ".2f"),
            fmt(entry["flops_per_image"] / 1e9 if "flops_per_image" in entry else None, ".1f"),
            fmt(entry.get("achieved_tflops"), ".3f"),
            fmt(100 * entry["mfu"] if entry.get("mfu") is not None else None, ".1f"),
            fmt(plain.get("images_per_s"), ".2f"), fmt(entry.get("speedup_over_plain"), ".2f"),
            mode_notes(mode, entry, record.device_type),
        ])
    return rows


def render(record: SpeedRecord) -> str:
    from tabulate import tabulate

    peak = record.matmul_peak_tflops
    lines = [tabulate(table_rows(record), headers=COLUMNS, disable_numparse=True)]
    if peak:
        lines.append(f"MFU against a measured {record.matmul_peak_dtype} matmul peak of {peak:.2f} TFLOP/s on "
                     f"{record.device}; peak memory is "
                     + ("CUDA max allocated" if record.device_type == "cuda" else "the process peak RSS"))
    floors = (record.modes.get("data") or {}).get("decode_floors")
    if floors:
        lines.append("PNG decode floors, one core, image + label: "
                     + ", ".join(f"{name} {rate:.1f} img/s" for name, rate in floors.items()))
    lines.append(f"record {record.path}")
    return "\n".join(lines)
