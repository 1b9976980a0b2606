"""`bench speed` as a whole: the measurements of harness.engine.benchmark for one row or many, onnxruntime beside
PyTorch, the record under results/speed/<device>/ and the table printed from it."""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from harness.config.benchmark import OFFICIAL_SPLIT_IMAGES
from harness.config.plan import make_plan
from harness.config.precision import resolve_precision
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
from harness.report.records import git_commit, package_versions, utc_now, write_record


def speed(options: SpeedOptions) -> dict[str, Any]:
    """Measure the requested modes, write the record under results/speed/<device>/ (a CPU's under runs/speed/, out
    of git and of benchmark.md's inference column, unless `keep_record`), return it."""
    from harness.paths import results_dir, runs_dir

    check_speed_options(options)
    spec = load_spec(options.row)
    modes = MODES if options.mode == "all" else (options.mode,)
    if {"train", "infer"} & set(modes):
        check_implemented(spec)
    device = pick_device(options.device, World())
    precision = resolve_precision(options.precision, device.type)
    # The epoch length (the official train split) changes no timing.
    plan = make_plan(spec, "cityscapes", OFFICIAL_SPLIT_IMAGES["train"], precision=precision,
                     machine_workers=loader_workers(1))
    counts = {**defaults(device), **{k: getattr(options, k) for k in ("warmup", "repeats", "steps")
                                     if getattr(options, k) is not None}}
    peak, peak_dtype = matmul_peak_tflops(device) if {"train", "infer"} & set(modes) else (None, None)
    bench = Bench(options, spec, plan, device, counts, peak)
    session = onnx_beside(options, device) if options.onnx else None
    sizes = resolve_sizes(spec, plan, device, options.size if session is None else onnx_input_size(session))
    results = measure_modes(bench, ("infer",) if session is not None else modes, sizes)
    if session is not None:
        results["infer onnxruntime"] = measure_onnx(session, results["infer"], counts)
    record = {  # write_record files a record under <dataset>/<row>/: here results/speed/<device>/<row>/
        "kind": "speed", "row": spec.row, "dataset": device_name(device), "device": device_name(device),
        "device_type": device.type, "device_memory_gib": device_memory_gib(device), "precision": precision,
        "compile": options.compile,
        "channels_last": device.type == "cuda", "cpu_threads": torch.get_num_threads(),
        "matmul_peak_tflops": peak, "matmul_peak_dtype": peak_dtype, **counts, "modes": results,
        "git_commit": git_commit(), "versions": package_versions(), "time": utc_now(),
    }
    kept = device.type != "cpu" or options.keep_record  # a CPU's figures are this machine's, not the table's
    record["_path"] = str(write_record(record, root=(results_dir() if kept else runs_dir()) / "speed"))
    return record


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
    from harness.config.spec import base_row, match_rows

    return [spec for spec in match_rows(pattern) if base_row(spec.row) == spec.row]


@dataclass
class RowsOutcome:
    records: list[dict[str, Any]]
    not_reached: list[str]  # rows not started: the budget would have been exceeded
    elapsed_s: float
    budget_s: Optional[float]


def speed_rows(pattern: str, options: SpeedOptions, budget_s: Optional[float] = None,
               echo: Callable[[str], None] = print, clock: Callable[[], float] = time.perf_counter) -> RowsOutcome:
    """Measure several rows one after another, each as `speed` does (a record each). With `budget_s`, a row is not
    started when the time spent plus the mean time of the rows measured so far would pass the budget: one short
    lease of a GPU yields what fits, and the rest is named."""
    if budget_s is not None and budget_s <= 0:
        raise BenchError(f"--budget-s {budget_s}: give a positive number of seconds")
    specs = select_rows(pattern)
    check_speed_options(options)
    began = now = clock()
    durations: list[float] = []
    records: list[dict[str, Any]] = []
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
    if mode in ("data", "data cached"):
        per_worker = entry.get("images_per_s_per_worker")
        what = "decoding PNGs" if mode == "data" else "reading decoded frames (--decoded-cache)"
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


def table_rows(record: dict[str, Any]) -> list[list[str]]:
    def fmt(value: Optional[float], spec: str) -> str:
        return "-" if value is None else format(value, spec)

    rows = []
    for mode, entry in record["modes"].items():
        plain = entry.get("plain_fp32_nchw") or {}
        rows.append([
            record["row"], mode + (f" ({entry['workers']} workers)" if mode.startswith("data") else ""),
            record["device"],
            record["precision"] if mode not in ("data", "data cached", "augment") else "-", str(entry["batch"]),
            "x".join(map(str, entry["size"])),
            fmt(entry["images_per_s"], ".2f"), fmt(1000 * entry["step_s"], ".1f"), fmt(entry["peak_memory_gib"], ".2f"),
            fmt(entry["flops_per_image"] / 1e9 if "flops_per_image" in entry else None, ".1f"),
            fmt(entry.get("achieved_tflops"), ".3f"),
            fmt(100 * entry["mfu"] if entry.get("mfu") is not None else None, ".1f"),
            fmt(plain.get("images_per_s"), ".2f"), fmt(entry.get("speedup_over_plain"), ".2f"),
            mode_notes(mode, entry, record["device_type"]),
        ])
    return rows


def render(record: dict[str, Any]) -> str:
    from tabulate import tabulate

    peak = record["matmul_peak_tflops"]
    lines = [tabulate(table_rows(record), headers=COLUMNS, disable_numparse=True)]
    if peak:
        lines.append(f"MFU against a measured {record['matmul_peak_dtype']} matmul peak of {peak:.2f} TFLOP/s on "
                     f"{record['device']}; peak memory is "
                     + ("CUDA max allocated" if record["device_type"] == "cuda" else "the process peak RSS"))
    lines.append(f"record {record['_path']}")
    return "\n".join(lines)
