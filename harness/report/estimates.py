"""What a row costs before it runs: iterations, images, GPU-hours and wall time (`bench plan`, `bench doctor`, and
the time limit `bench sweep` asks Slurm for), on a named device.

The device (`resolve_device`): the one named (`--device`: a GPU of the catalogue, harness.config.devices, by short,
product or torch name; a device with speed records; or `cpu`), else this machine's GPU, else the device of the newest
GPU speed record; else none, and the caller asks for `--device` (CPU figures come only with `--device cpu`, and are
CPU-hours).

A run processes its plan's iterations x global batch training crops (harness.config.plan, the one budget formula)
and, at each evaluation, the val split once per evaluated model (raw, and EMA on EMA rows). The rate of each is,
in this order:
- "measured on DEVICE": a `bench speed` record of the device (results/speed/<device>/<row>/): the row's, else that
  of a row with the same network (an EMA variant), scaled by FLOPs when the record timed another size;
- "calibrated on DEVICE": the row's FLOPs at the device's peak (the catalogue's dense datasheet figure in the run's
  precision) times the model FLOP utilisation (MFU) a GPU speed record of the same network family reached on its
  own device (the newest; one of the target device first);
- "assumed": the same at an assumed MFU (`ASSUMED_MFU`);
- "unknown": no record and no peak (a device outside the catalogue without records).
FLOPs are counted once per network and size (harness.report.model_costs). GPU-hours are the single-device rate's;
the wall time on N GPUs assumes the rate scales with N (the global batch is the spec's whatever N; the per-GPU batch
shrinks, so N GPUs are rarely quite N times faster: the sweep adds a margin). A light-seg row shares its base row's
runs and costs nothing extra.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from harness.config.benchmark import OFFICIAL_SPLIT_IMAGES
from harness.config.devices import CPU, GpuModel, find_gpu, folder_name, is_cpu, unknown_device
from harness.config.plan import iterations_per_epoch, planned_iterations
from harness.config.precision import resolve_precision
from harness.config.spec import Spec, base_row
from harness.errors import BenchError
from harness.report.model_costs import model_costs
from harness.report.records import SpeedRecord, load_speed_records, speed_dir

# The share of the datasheet's dense peak (model FLOP utilisation, MFU) a training or inference step is assumed to
# reach where no speed record of its network family calibrates it. Evidence: NVIDIA's DeepLearningExamples ResNet-50
# v1.5 (PyTorch, AMP, DALI) trains 2,470 img/s on one A100 80GB, about 3 x 8.2 GFLOPs each at 224x224: 61 TFLOP/s,
# 19% of the A100's 312; dilated high-resolution segmentation networks (batch norm, bilinear upsampling, small late
# feature maps) and faster GPUs reach less. `bench speed` on one GPU of the family replaces the assumption.
ASSUMED_MFU = 0.15
MEASURED, CALIBRATED, ASSUMED, UNKNOWN = "measured", "calibrated", "assumed", "unknown"
NVIDIA_GPUS = Path("/proc/driver/nvidia/gpus")


def speed_records(device: Optional[str] = None) -> list[SpeedRecord]:
    """`bench speed` records (results/speed/<device>/<row>/*.json), of one device or all, oldest first."""
    return load_speed_records(device)


def this_gpu() -> Optional[str]:
    """The folder name of this machine's first GPU, None without one; torch is imported only where the NVIDIA
    driver lists a GPU (on Linux), so a login node answers at once."""
    if sys.platform.startswith("linux") and not (NVIDIA_GPUS.is_dir() and any(NVIDIA_GPUS.iterdir())):
        return None
    import torch

    from harness.engine.device import device_name

    return device_name(torch.device("cuda", 0)) if torch.cuda.is_available() else None


def this_cpu() -> str:
    import torch

    from harness.engine.device import device_name

    return device_name(torch.device("cpu"))


@dataclass(frozen=True)
class Target:
    """The device figures are for."""

    name: str  # the catalogue's short name, or the device's folder name (as its speed records name it)
    gpu: Optional[GpuModel]  # its catalogue entry
    cpu: bool = False
    why: str = "named"  # how it was chosen

    def owns(self, device: str) -> bool:
        """Whether a record's device is this one (a catalogue GPU by any of its names)."""
        if self.gpu is not None:
            return find_gpu(device) is self.gpu
        return folder_name(device) == self.name

    @property
    def unit(self) -> str:
        return "CPU" if self.cpu else "GPU"

    @property
    def shown(self) -> str:
        return f"{self.gpu.name} ({self.gpu.key})" if self.gpu is not None else self.name


def target_of(name: str) -> Target:
    """The device of a name already accepted (a record's, this machine's): its catalogue entry where it has one."""
    gpu = find_gpu(name)
    return Target(gpu.key, gpu) if gpu is not None else Target(folder_name(name), None, cpu=is_cpu(folder_name(name)))


NEED_DEVICE = ("name the GPU the runs will use with --device (a short name such as h100, a100-80gb, l40s; a product "
               "or torch name; see harness/config/devices.py), or --device cpu for this machine's CPU")


def resolve_device(requested: Optional[str], records: Optional[list[SpeedRecord]] = None) -> Target:
    """The device figures are for (see the module's text); a one-line error when none can be told."""
    records = speed_records() if records is None else records
    recorded = {folder_name(r.device): r.device_type for r in records}
    if requested is not None:
        requested = requested.strip()
        if not requested:
            raise BenchError(f"--device is empty; {NEED_DEVICE}")
        if requested == CPU:
            return Target(this_cpu(), None, cpu=True)
        gpu = find_gpu(requested)
        if gpu is not None:
            return Target(gpu.key, gpu)
        if folder_name(requested) in recorded:
            name = folder_name(requested)
            return Target(name, None, cpu=recorded[name] == "cpu" or is_cpu(name))
        raise BenchError(unknown_device(requested, tuple(n for n in recorded if find_gpu(n) is None)))
    here = this_gpu()
    if here is not None:
        return Target(here, find_gpu(here), why="this machine's GPU")
    gpus = [r for r in records if r.device_type == "cuda"]
    if gpus:
        newest = folder_name(gpus[-1].device)
        return Target(newest, find_gpu(newest), why=f"the newest GPU speed record ({gpus[-1].path})")
    raise BenchError(f"no GPU on this machine and no GPU speed record under {speed_dir()}: {NEED_DEVICE}")


def same_network(spec: Spec) -> Optional[str]:
    """The row's network and recipe step, as a key: its model (starting weights aside) and crop."""
    return repr((spec.network_key, list(spec.train.crop_size), spec.loss.aux_weights))


def network_family(spec: Spec) -> str:
    """The row's network family: its model family (and segmentation-models-pytorch's architecture)."""
    return spec.model.family + (f"/{spec.model.arch}" if spec.model.arch else "")


def recorded_spec(row: str) -> Optional[Spec]:
    """The spec of a recorded row, None when it is gone."""
    from harness.config.spec import load_spec

    if row not in _SPECS:
        try:
            _SPECS[row] = load_spec(row)
        except BenchError:
            _SPECS[row] = None
    return _SPECS[row]


def recorded_network(row: str) -> Optional[str]:
    """`same_network` of a recorded row, None when its spec is gone."""
    spec = recorded_spec(row)
    return None if spec is None else same_network(spec)


_SPECS: dict[str, Optional[Spec]] = {}


@dataclass(frozen=True)
class Rate:
    images_per_s: Optional[float]  # per device
    label: str
    basis: str = MEASURED  # measured, calibrated, assumed or unknown


@dataclass(frozen=True)
class Peak:
    tflops: float
    shown: str  # what it is and where it comes from


def record_peak(record: SpeedRecord) -> Optional[float]:
    """The peak a record's MFU is taken against: its device's datasheet figure in the record's precision (the
    catalogue), else the matmul peak the record measured."""
    gpu = find_gpu(record.device)
    if gpu is not None and record.device_type == "cuda":
        return gpu.peak(record.precision)[0]
    measured = record.matmul_peak_tflops
    return float(measured) if measured else None


class Rates:
    """Training and inference rates of rows on one device, from its records, calibrated from another's, or assumed."""

    def __init__(self, target: Target, records: Optional[list[SpeedRecord]] = None, measure_peak: bool = True):
        every = speed_records() if records is None else records
        self.target = target
        self.device = target.name
        self.records = [r for r in every if target.owns(r.device)]
        kind = "cpu" if target.cpu else "cuda"
        owned = {id(r) for r in self.records}
        # the newest last, this device's own records after every other's: calibration walks back from the end
        self.calibrating = [r for r in every if r.device_type == kind and id(r) not in owned] + \
            [r for r in self.records if r.device_type == kind]
        self.precision = resolve_precision(None, kind)
        self.measure_peak = measure_peak
        self._peak: Optional[Peak] = None

    def peak(self) -> Optional[Peak]:
        """The device's peak in the run's precision: the catalogue's datasheet figure; else the newest record's
        measured matmul peak; else measured here when it is this machine's CPU."""
        if self._peak is None:
            gpu = self.target.gpu
            recorded = [r for r in self.records if r.matmul_peak_tflops]
            if gpu is not None:
                tflops, what = gpu.peak(self.precision)
                self._peak = Peak(tflops, gpu.describe(self.precision))
            elif recorded:
                newest = recorded[-1]
                tflops = float(newest.matmul_peak_tflops or 0)
                self._peak = Peak(tflops, f"{self.device}: {tflops:.3g} TFLOP/s {newest.matmul_peak_dtype} "
                                          f"matmul peak, measured by bench speed ({newest.path})")
            elif self.measure_peak and self.target.cpu and self.device == this_cpu():
                import torch

                from harness.engine.device import matmul_peak_tflops

                tflops, dtype = matmul_peak_tflops(torch.device("cpu"))
                self._peak = Peak(tflops, f"{self.device}: {tflops:.3g} TFLOP/s {dtype} matmul peak, measured now")
        return self._peak

    def flops(self, spec: Spec, kind: str, size: list[int]) -> int:
        costs = model_costs()
        if kind == "train":
            return costs.training(spec, int(size[0]), int(size[1])).flops
        return costs.inference_flops(spec, int(size[0]), int(size[1]))

    def entry(self, spec: Spec, modes: tuple[str, ...]) -> Optional[tuple[str, dict[str, Any], SpeedRecord]]:
        """(mode, entry, record) of the newest record entry in the first of `modes` found: of the row or its base
        row, else of a row with the same network (an EMA or MSeg variant: the same step but for the EMA update)."""
        own = {spec.row, base_row(spec.row)}
        network = same_network(spec)
        for rows in (own, None):
            for mode in modes:
                for record in reversed(self.records):
                    entry = record.modes.get(mode)
                    if not entry or not entry.get("images_per_s"):
                        continue
                    row = record.row
                    if (row in own) if rows is not None else (network is not None and recorded_network(row) == network):
                        return mode, entry, record
        return None

    def calibration(self, spec: Spec, kind: str) -> Optional[tuple[float, SpeedRecord]]:
        """(MFU, record) of the newest speed record of the row's network family with FLOPs in the mode: one of
        this device first."""
        mode = "train" if kind == "train" else "infer"
        family = network_family(spec)
        for record in reversed(self.calibrating):
            entry = record.modes.get(mode)
            if not entry or not entry.get("images_per_s") or not entry.get("flops_per_image"):
                continue
            recorded = recorded_spec(record.row)
            peak = record_peak(record)
            if recorded is None or network_family(recorded) != family or not peak:
                continue
            return float(entry["images_per_s"]) * float(entry["flops_per_image"]) / (peak * 1e12), record
        return None

    def rate(self, spec: Spec, kind: str, size: list[int]) -> Rate:
        """Images per second per device of a training step ("train") at `size`, or of inference ("infer") at
        `size` (the evaluation loop's figure where recorded)."""
        modes = ("train",) if kind == "train" else ("eval", "infer")
        found = self.entry(spec, modes)
        if found is not None:
            mode, entry, record = found
            row = record.row
            rate = float(entry["images_per_s"])
            measured = f"{MEASURED} on {record.device}" + \
                ("" if row in (spec.row, base_row(spec.row)) else f" as {row}")
            if list(entry.get("size") or []) == list(size):
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
            return Rate(None, f"{UNKNOWN}: no bench speed record of {self.device} and no peak (not in the catalogue)",
                        UNKNOWN)
        flops = self.flops(spec, kind, size)
        calibrated = self.calibration(spec, kind)
        if calibrated is not None:
            mfu, record = calibrated
            return Rate(peak.tflops * 1e12 * mfu / flops,
                        f"{CALIBRATED} on {record.device}: MFU {100 * mfu:.1f}% ({record.row})",
                        CALIBRATED)
        return Rate(peak.tflops * 1e12 * ASSUMED_MFU / flops, f"{ASSUMED}: MFU {100 * ASSUMED_MFU:.0f}%", ASSUMED)


@dataclass
class RowCost:
    row: str
    runs_of: str  # the row whose runs are counted (a light-seg row's base row)
    iterations: int  # per run
    images: int  # training crops per run
    eval_images: int  # val images inferred per run (every evaluation, every evaluated model)
    gpu_hours: Optional[float]  # per run
    gpus: int
    label: str  # where the rates come from: measured on DEVICE / calibrated on DEVICE: ... / assumed: ... / unknown
    seeds: int = 1
    basis: str = MEASURED  # of the training rate: measured, calibrated, assumed or unknown

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
                   seeds, train_rate.basis)


def hours(value: Optional[float]) -> str:
    """Hours as H:MM (or days and hours past 48 h)."""
    if value is None:
        return "-"
    minutes = int(math.ceil(value * 60))
    if minutes >= 48 * 60:
        return f"{minutes // 1440}d {minutes % 1440 / 60:.1f}h"
    return f"{minutes // 60}:{minutes % 60:02d}"
