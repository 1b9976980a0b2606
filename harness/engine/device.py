"""The device a process computes on: which one, how it is seeded and made deterministic, what it is called, how
much memory it has and the process has used on it, how long work on it takes, and its matrix-multiply peak."""

from __future__ import annotations

import os
import platform
import random
import re
import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from harness.config.devices import folder_name
from harness.engine.distributed import World
from harness.errors import BenchError

DEVICE_NAMES = re.compile(r"^(cpu|cuda(:\d+)?)$")


def check_device_name(name: Optional[str]) -> None:
    if name is not None and not DEVICE_NAMES.match(name):
        raise BenchError(f"--device {name}: accepted cpu, cuda or cuda:N")


def default_device_type(name: Optional[str]) -> str:
    """'cuda' or 'cpu': the type of `--device`, or of the default device of this machine."""
    return (name or ("cuda" if torch.cuda.is_available() else "cpu")).split(":")[0]


def pick_device(name: Optional[str], world: World) -> torch.device:
    """`--device` (default: cuda when available); each process of a distributed run takes its local GPU."""
    check_device_name(name)
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise BenchError(f"--device {name}: no CUDA device is available; use --device cpu")
        if world.distributed or name == "cuda":
            return torch.device("cuda", world.local_rank)
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def set_deterministic() -> None:
    """Deterministic kernels wherever PyTorch has them. Bilinear upsampling and adaptive average pooling have no
    deterministic CUDA backward, and every family uses one of them: those warn instead of stopping the run."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float:
    """CUDA: the peak of allocated memory since the last reset. CPU: the process's peak resident set size since
    it started (the kernel keeps no resettable peak), so it covers everything this process did before."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def device_name(device: torch.device) -> str:
    """A folder-safe name of the device: the GPU's marketing name, or the CPU model."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or "cpu"
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    name = "cpu " + line.split(":", 1)[1]
                    break
        except OSError:
            pass
    return folder_name(name) or device.type


def device_memory_gib(device: torch.device) -> Optional[float]:
    """The device's total memory (a GPU's; None for the CPU, whose limit is the machine's)."""
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).total_memory / 2**30


def time_steps(step: Callable[[], Any], device: torch.device, warmup: int, repeats: int, steps: int,
               clock: Callable[[], float] = time.perf_counter) -> list[float]:
    """Seconds per call of `step`, one figure per repeat of `steps` calls, after `warmup` calls; on a GPU the
    calls are timed with CUDA events around the work queued, not the host's time to queue it (`clock`: the host's
    timer elsewhere)."""
    for _ in range(warmup):
        step()
    synchronize(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(steps):
                step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000 / steps)
        else:
            began = clock()
            for _ in range(steps):
                step()
            times.append((clock() - began) / steps)
    return times


_PEAKS: dict[tuple[str, str], float] = {}


def matmul_peak_tflops(device: torch.device) -> tuple[float, str]:
    """The best of repeated square matrix multiplies on `device`: bf16 on a GPU, fp32 on the CPU (TFLOP/s)."""
    dtype, n, reps = (torch.bfloat16, 8192, 20) if device.type == "cuda" else (torch.float32, 2048, 3)
    key = (str(device), str(dtype))
    if key not in _PEAKS:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        times = time_steps(lambda: torch.mm(a, b), device, warmup=1, repeats=reps, steps=1)
        _PEAKS[key] = 2 * n**3 / min(times) / 1e12
        del a, b
    return _PEAKS[key], str(dtype).removeprefix("torch.")
