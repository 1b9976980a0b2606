"""What a row costs before it runs: iterations, images, GPU-hours and wall time (`bench plan`, `bench doctor`, and
the time limit `bench sweep` asks Slurm for).

A run processes its plan's iterations x global batch training crops (harness.config.plan, the one budget formula)
and, at each evaluation, the val split once per evaluated model (raw, and EMA on EMA rows). The rate of each comes
from `bench speed` records of the device (results/speed/<device>/<row>/): "measured on DEVICE" (the row's record, else
that of a row with the same network, as an EMA variant), scaled by FLOPs when the record timed another size than the
row's crop or test size; where no record exists, from the row's FLOPs
and the device's measured matrix-multiply peak at an assumed utilisation ("estimate"); else "unknown".
GPU-hours are the single-device rate's; the wall time on N GPUs assumes the rate scales with N (the global batch
is the spec's whatever N; the per-GPU batch shrinks, so N GPUs are rarely quite N times faster: the sweep adds a
margin). A light-seg row shares its base row's runs and costs nothing extra.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Optional

from harness.config.benchmark import OFFICIAL_SPLIT_IMAGES
from harness.config.plan import iterations_per_epoch, planned_iterations
from harness.config.spec import Spec, base_row
from harness.report.records import SpeedRecord, load_speed_records

ASSUMED_MFU = 0.3  # share of the measured matmul peak a convolutional training step reaches, for estimates only
MEASURED = "measured on"
ESTIMATE = "estimate"
UNKNOWN = "unknown"


def speed_records(device: Optional[str] = None) -> list[SpeedRecord]:
    """`bench speed` records (harness.report.records.speed_dir), of one device or all, oldest first."""
    return load_speed_records(device)


def recorded_devices() -> dict[str, str]:
    """Device name -> device type ("cuda", "cpu") of every device with a speed record."""
    return {r.device: r.device_type for r in speed_records()}


def choose_device(requested: Optional[str]) -> str:
    """The device figures are for: the one asked for (a name as `bench speed` records it, e.g. nvidia-h200), else
    this machine's GPU, else the GPU with the most speed records, else this machine's CPU."""
    if requested:
        return requested
    import torch

    from harness.engine.device import device_name

    if torch.cuda.is_available():
        return device_name(torch.device("cuda", 0))
    gpus = [r.device for r in speed_records() if r.device_type == "cuda"]
    if gpus:
        return max(set(gpus), key=gpus.count)
    return device_name(torch.device("cpu"))


def local_device(device: str) -> Optional[Any]:
    """This machine's torch device of that name, if it has one."""
    import torch

    from harness.engine.device import device_name

    candidates = [torch.device("cuda", 0)] if torch.cuda.is_available() else []
    candidates.append(torch.device("cpu"))
    return next((d for d in candidates if device_name(d) == device), None)


def same_network(spec: Spec) -> Optional[str]:
    """The row's network and recipe step, as a key: its model (starting weights aside) and crop."""
    model = dataclasses.replace(spec.model, backbone_checkpoint=None, init_checkpoint=None)
    return repr((dataclasses.asdict(model), list(spec.train.crop_size), spec.loss.aux_weights))


def recorded_network(row: str) -> Optional[str]:
    """`same_network` of a recorded row, None when its spec is gone."""
    from harness.config.spec import load_spec
    from harness.errors import BenchError

    if row not in _NETWORKS:
        try:
            _NETWORKS[row] = same_network(load_spec(row))
        except BenchError:
            _NETWORKS[row] = None
    return _NETWORKS[row]


_NETWORKS: dict[str, Optional[str]] = {}


@dataclass(frozen=True)
class Rate:
    images_per_s: Optional[float]  # per device
    label: str


class Rates:
    """Training and inference rates of rows on one device, from its records or its peak."""

    def __init__(self, device: str, records: Optional[list[SpeedRecord]] = None, measure_peak: bool = True):
        self.device = device
        self.records = speed_records(device) if records is None else [r for r in records if r.device == device]
        self.measure_peak = measure_peak
        self._peak: Optional[tuple[float, str]] = None
        self._flops: dict[tuple[str, str, int, int], int] = {}

    def peak(self) -> Optional[tuple[float, str]]:
        """(TFLOP/s, dtype) of the device's matmul peak: the newest record's, else measured here when it is this
        machine's device."""
        if self._peak is None:
            recorded = [r for r in self.records if r.matmul_peak_tflops]
            if recorded:
                self._peak = (float(recorded[-1].matmul_peak_tflops or 0), str(recorded[-1].matmul_peak_dtype))
            elif self.measure_peak and (here := local_device(self.device)) is not None:
                from harness.engine.device import matmul_peak_tflops

                self._peak = matmul_peak_tflops(here)
        return self._peak

    def flops(self, spec: Spec, kind: str, size: list[int]) -> int:
        from harness.models.sizes import inference_flops, training_flops

        key = (repr(dataclasses.asdict(spec.model)), kind, int(size[0]), int(size[1]))
        if key not in self._flops:
            count = training_flops if kind == "train" else inference_flops
            self._flops[key] = count(spec, int(size[0]), int(size[1]))
        return self._flops[key]

    def entry(self, spec: Spec, modes: tuple[str, ...]) -> Optional[tuple[str, dict[str, Any], str]]:
        """(mode, entry, row) of the newest record entry in the first of `modes` found: of the row or its base row,
        else of a row with the same network (an EMA or MSeg variant: the same step but for the EMA update)."""
        own = {spec.row, base_row(spec.row)}
        network = same_network(spec)
        for rows in (own, None):
            for mode in modes:
                for record in reversed(self.records):
                    entry = record.modes.get(mode)
                    if not entry or not entry["images_per_s"]:
                        continue
                    row = record.row
                    if (row in own) if rows is not None else (network is not None and recorded_network(row) == network):
                        return mode, entry, row
        return None

    def rate(self, spec: Spec, kind: str, size: list[int]) -> Rate:
        """Images per second per device of a training step ("train") at `size`, or of inference ("infer") at
        `size` (the evaluation loop's figure where recorded)."""
        modes = ("train",) if kind == "train" else ("eval", "infer")
        found = self.entry(spec, modes)
        if found is not None:
            mode, entry, row = found
            rate = float(entry["images_per_s"])
            measured = f"{MEASURED} {self.device}" + ("" if row in (spec.row, base_row(spec.row)) else f" as {row}")
            if list(entry["size"]) == list(size):
                return Rate(rate, measured)
            recorded_flops = entry.get("flops_per_image")
            if mode == "eval":  # the evaluation loop's record has no FLOPs: those of its inference at that size
                recorded_flops = self.flops(spec, "infer", entry["size"])
            if recorded_flops:
                scaled = rate * recorded_flops / self.flops(spec, kind, size)
                shown = "x".join(map(str, entry["size"]))
                return Rate(scaled, f"{measured} at {shown}, scaled by FLOPs")
        peak = self.peak()
        if peak is None:
            return Rate(None, f"{UNKNOWN}: no bench speed record or matmul peak of {self.device}")
        tflops, dtype = peak
        rate = tflops * 1e12 * ASSUMED_MFU / self.flops(spec, kind, size)
        return Rate(rate, f"{ESTIMATE}: FLOPs at {100 * ASSUMED_MFU:.0f}% of {self.device}'s {tflops:.3g} TFLOP/s "
                          f"{dtype} matmul peak")


@dataclass
class RowCost:
    row: str
    runs_of: str  # the row whose runs are counted (a light-seg row's base row)
    iterations: int  # per run
    images: int  # training crops per run
    eval_images: int  # val images inferred per run (every evaluation, every evaluated model)
    gpu_hours: Optional[float]  # per run
    gpus: int
    label: str  # where the rates come from: measured on DEVICE / estimate: ... / unknown: ...
    seeds: int = 1

    @property
    def shared(self) -> bool:
        return self.runs_of != self.row

    @property
    def wall_hours(self) -> Optional[float]:
        return None if self.gpu_hours is None else self.gpu_hours / self.gpus

    @property
    def total_gpu_hours(self) -> Optional[float]:
        if self.shared:
            return 0.0
        return None if self.gpu_hours is None else self.gpu_hours * self.seeds


def evaluations(iters: int, eval_every: int) -> int:
    """How many times a run evaluates: every `eval_every` iterations and at the end, once at the last one."""
    return (iters - 1) // eval_every + 1 if eval_every and iters > 0 else 1


def row_cost(spec: Spec, rates: Rates, gpus: int = 8, seeds: int = 1, iterations: Optional[int] = None) -> RowCost:
    """One row's run on `gpus` GPUs, at the table's recipe on Cityscapes (or `iterations` of it)."""
    train_images = OFFICIAL_SPLIT_IMAGES["train"]
    iters = planned_iterations(spec) if iterations is None else iterations
    batch = spec.columns.batch_size
    eval_every = spec.train.eval_every_epochs * iterations_per_epoch(train_images, batch)
    models = 2 if spec.columns.ema else 1
    images = iters * batch
    eval_images = evaluations(iters, eval_every) * OFFICIAL_SPLIT_IMAGES["val"] * models
    train_rate = rates.rate(spec, "train", spec.train.crop_size)
    infer_rate = rates.rate(spec, "infer", spec.columns.test_size)
    gpu_hours = None
    if train_rate.images_per_s and infer_rate.images_per_s:
        gpu_hours = (images / train_rate.images_per_s + eval_images / infer_rate.images_per_s) / 3600
    labels = [train_rate.label] if train_rate.label == infer_rate.label else \
        [f"train {train_rate.label}", f"eval {infer_rate.label}"]
    return RowCost(spec.row, base_row(spec.row), iters, images, eval_images, gpu_hours, gpus, "; ".join(labels),
                   seeds)


def hours(value: Optional[float]) -> str:
    """Hours as H:MM (or days and hours past 48 h)."""
    if value is None:
        return "-"
    minutes = int(math.ceil(value * 60))
    if minutes >= 48 * 60:
        return f"{minutes // 1440}d {minutes % 1440 / 60:.1f}h"
    return f"{minutes // 60}:{minutes % 60:02d}"
