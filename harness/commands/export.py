"""`bench export`: a trained checkpoint's network as ONNX (checked by onnxruntime against PyTorch right after export)
or as safetensors (the network's tensors only, the row and plan in its metadata)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from harness.engine.trained import load_trained_state
from harness.errors import BenchError
from harness.outputs.model_export import (
    export_metadata,
    export_onnx,
    export_safetensors,
    read_safetensors,
    require_onnx,
)

FORMATS = {"onnx": ".onnx", "safetensors": ".safetensors"}


def export(checkpoint: str, fmt: str, weights: Optional[str] = None, out: Optional[Path] = None,
           size: Optional[tuple[int, int]] = None, row: Optional[str] = None) -> str:
    """Write the export and return the line that says what was written (and, for ONNX, how close it is)."""
    if fmt not in FORMATS:
        raise BenchError(f"--format {fmt}: use {' or '.join(FORMATS)}")
    if fmt == "onnx":
        require_onnx()  # before reading a large checkpoint
    spec, model, chosen, state = load_trained_state(checkpoint, row, weights)
    plan = dict(state.get("plan") or {})
    source = Path(checkpoint).expanduser()
    target = Path(out) if out is not None else source.with_name(f"{source.stem}-{chosen}{FORMATS[fmt]}")
    metadata = export_metadata(spec.row, chosen, plan, source)
    if fmt == "safetensors":
        path = export_safetensors(model, target, metadata)
        tensors, _ = read_safetensors(path)
        return f"wrote {path}: {len(tensors)} tensors of {spec.row}'s network ({chosen} weights), row and plan in " \
               "its metadata"
    if size is None:
        if not plan.get("test_size"):
            raise BenchError(f"checkpoint {source} records no test size; pass --size W,H")
        size = (int(plan["test_size"][0]), int(plan["test_size"][1]))
    return export_onnx(model, target, size, metadata).summary()
