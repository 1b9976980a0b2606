"""How a run computes: its precision (autocast type), memory format and optimizer kernel. Each is what the user
asks for, on any device; the defaults alone depend on the device (a GPU: bf16, channels_last, fused SGD; the CPU:
fp32, NCHW, the for-loop SGD, the fastest there)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from harness.errors import BenchError

if TYPE_CHECKING:
    import torch

PRECISIONS = ("fp32", "bf16", "fp16")


def autocast_dtype(precision: str) -> Optional[torch.dtype]:
    """The autocast dtype of a precision; None for fp32 (no autocast)."""
    import torch

    dtypes = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    if precision not in dtypes:
        raise BenchError(f"precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    return dtypes[precision]


def on_gpu(device_type: str) -> bool:
    """The one place a device type picks the defaults (the GPU's are the project's way of running a step)."""
    return device_type == "cuda"


def resolve_precision(requested: Optional[str], device_type: str) -> str:
    """The precision a run uses: the one asked for, else bf16 on a GPU and fp32 on the CPU (where autocast is
    slower, but runs: the CPU test lane trains in bf16 as a GPU does)."""
    if requested is None:
        return "bf16" if on_gpu(device_type) else "fp32"
    if requested not in PRECISIONS:
        raise BenchError(f"--precision {requested}: use one of {', '.join(PRECISIONS)}")
    return requested


@dataclass(frozen=True)
class Compute:
    """How a step, the evaluation loop and `bench speed` compute, resolved once. The precision is part of the
    recipe (the plan keeps it; a resume refuses a change); the memory format and the optimizer kernel are not (the
    same sums, in another order or layout: a resumed run may change them, as it may change --compile)."""

    precision: str
    channels_last: bool
    fused: bool

    @property
    def autocast(self) -> Optional[torch.dtype]:
        return autocast_dtype(self.precision)


PLAIN = Compute("fp32", channels_last=False, fused=False)  # the torchvision references' way: fp32, NCHW, for-loop SGD


def resolve_compute(device_type: str, precision: Optional[str] = None, channels_last: Optional[bool] = None,
                    fused: Optional[bool] = None) -> Compute:
    """What was asked for, each unset setting at the device's default."""
    gpu = on_gpu(device_type)
    return Compute(resolve_precision(precision, device_type), gpu if channels_last is None else channels_last,
                   gpu if fused is None else fused)
