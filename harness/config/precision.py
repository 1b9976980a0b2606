"""The precisions a run trains and evaluates in: their names, autocast types and where each may run."""

from __future__ import annotations

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


def resolve_precision(requested: Optional[str], device_type: str) -> str:
    """The precision a run uses: bf16 by default on a GPU, fp32 on the CPU (always: CPU autocast is no faster)."""
    if requested is None:
        return "bf16" if device_type == "cuda" else "fp32"
    if requested not in PRECISIONS:
        raise BenchError(f"--precision {requested}: use one of {', '.join(PRECISIONS)}")
    if device_type == "cpu" and requested != "fp32":
        raise BenchError(f"--precision {requested} needs a GPU; CPU runs train in fp32")
    return requested
