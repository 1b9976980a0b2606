"""A trained network as files other tools read: ONNX (checked by onnxruntime against PyTorch on the same input right
after export) and safetensors (only the network's tensors, with the row and its plan in the metadata).

ONNX: PyTorch's TorchScript exporter (`torch.onnx.export(dynamo=False)`, opset `OPSET`), which needs no onnxscript
and exports these networks in seconds where the torch.export-based one takes tens of seconds. The input is
`image`, float32 N x 3 x H x W, normalised as the row's plan says (its mean and std on 0-255 RGB, kept in the
model's metadata), at a fixed H x W; the batch axis is dynamic. The output `logits` is N x 19 x H x W, the
eval-mode main output. What needed care, by family:

- PSPNet, ICNet, DF-Seg and SFNet pool their pyramid with adaptive average pooling to 1, 2, 3 and 6 bins; the
  exporter refuses output sizes that do not divide the input (3 and 6 bins of a 64 x 128 map). At a fixed input
  size such a pool is a product with two constant averaging matrices (`MatrixAveragePool`: the same bins as
  PyTorch's, floor(i H / o) to ceil((i + 1) H / o)), exported as two MatMul nodes.
- SFNet's flow alignment warps with `grid_sample` (bilinear, zero padding, align_corners=False): ONNX GridSample,
  opset 16 or later.
- BiSeNet's heads use PixelShuffle (DepthToSpace); every family upsamples with bilinear align_corners=True
  (Resize, coordinate_transformation_mode align_corners).
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from harness.errors import BenchError
from harness.files import atomic_output, new_temporary_file

OPSET = 17
INPUT, OUTPUT = "image", "logits"
# onnxruntime and PyTorch sum in different orders; the bound scales with the logits' magnitude.
TOLERANCE = 1e-4
EXTRA_HINT = "pip install 'segbench[export]' (onnx and onnxruntime)"


def require_onnx() -> tuple[Any, Any]:
    """(onnx, onnxruntime), or one line saying how to install them."""
    try:
        import onnx
        import onnxruntime
    except ImportError as exc:
        raise BenchError(f"ONNX needs the optional export extra ({exc.name or 'onnx'} is not installed): "
                         f"{EXTRA_HINT}") from None
    return onnx, onnxruntime


def _averaging_matrix(size: int, bins: int, dtype: torch.dtype) -> torch.Tensor:
    matrix = np.zeros((bins, size), dtype=np.float64)
    for i in range(bins):
        start, end = (i * size) // bins, math.ceil((i + 1) * size / bins)
        matrix[i, start:end] = 1.0 / (end - start)
    return torch.from_numpy(matrix).to(dtype)


class MatrixAveragePool(nn.Module):
    """AdaptiveAvgPool2d as two products with constant averaging matrices, for an input size fixed at export."""

    def __init__(self, output_size: Any):
        super().__init__()
        pair = output_size if isinstance(output_size, (tuple, list)) else (output_size, output_size)
        self.output_size = (int(pair[0]), int(pair[1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = int(x.shape[-2]), int(x.shape[-1])
        bins_h, bins_w = self.output_size
        if height % bins_h == 0 and width % bins_w == 0:  # a plain AveragePool the exporter handles
            return nn.functional.adaptive_avg_pool2d(x, self.output_size)
        rows = _averaging_matrix(height, bins_h, x.dtype)
        columns = _averaging_matrix(width, bins_w, x.dtype)
        return torch.matmul(torch.matmul(rows, x), columns.t())


def exportable(model: nn.Module) -> nn.Module:
    """A copy of `model` in eval mode whose adaptive average pools the exporter can write (the original is kept)."""
    model = copy.deepcopy(model).eval()
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.AdaptiveAvgPool2d) and child.output_size not in (1, (1, 1)):
                setattr(module, name, MatrixAveragePool(child.output_size))
    return model


@dataclass
class OnnxExport:
    path: Path
    opset: int
    size: tuple[int, int]  # [width, height]
    max_abs_diff: float  # onnxruntime against PyTorch, on the same input
    bound: float  # the largest difference accepted
    max_abs_logit: float
    operators: list[str]
    checked_batch: int
    export_s: float

    def summary(self) -> str:
        return (f"wrote {self.path} (opset {self.opset}, {self.size[0]}x{self.size[1]}, dynamic batch; "
                f"{len(self.operators)} operator types); onnxruntime vs PyTorch on a batch of {self.checked_batch}: "
                f"max abs difference {self.max_abs_diff:.2e} (bound {self.bound:.1e}, largest logit "
                f"{self.max_abs_logit:.2f})")


def check_batch(size: tuple[int, int], batch: int = 2, seed: int = 0) -> torch.Tensor:
    """A batch of normalised-looking images: more than one image, so the dynamic batch axis is exercised."""
    width, height = size
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


def onnx_session(path: Path, threads: Optional[int] = None, device: str = "cpu") -> Any:
    _, ort = require_onnx()
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    providers = ["CPUExecutionProvider"]
    if device == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    try:
        return ort.InferenceSession(str(path), options, providers=providers)
    except Exception as exc:  # onnxruntime raises its own types for a file it cannot load
        raise BenchError(f"onnxruntime cannot load {path}: {str(exc).splitlines()[0][:200]}; give an ONNX file "
                         "written by `bench export --format onnx`") from None


def export_onnx(model: nn.Module, path: Path, size: tuple[int, int], metadata: Optional[dict[str, str]] = None,
                opset: int = OPSET, check: int = 2) -> OnnxExport:
    """Write `model` (eval mode, its main logits) as ONNX at `size` with a dynamic batch axis, then run onnxruntime
    and PyTorch on the same batch of `check` images; a difference above the bound is an error (the file is kept
    aside as <path>.rejected for inspection)."""
    onnx, _ = require_onnx()
    path = Path(path)
    model = model.eval()
    x = check_batch(size, check)
    began = time.perf_counter()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # A name of this export's own: two exports to one path at once never write into each other's file.
        handle, name = new_temporary_file(path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise cannot_write(path, exc) from None
    os.close(handle)
    tmp = Path(name)
    try:  # whatever ends the export (an error, Ctrl-C), the temporary file goes with it
        try:
            with warnings.catch_warnings():
                # The TorchScript exporter announces its deprecation and traces shapes as constants on purpose:
                # the height and width are fixed, only the batch axis is dynamic.
                warnings.simplefilter("ignore")
                torch.onnx.export(exportable(model), (x[:1],), str(tmp), input_names=[INPUT], output_names=[OUTPUT],
                                  opset_version=opset, dynamo=False, do_constant_folding=True,
                                  dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}})
            proto = onnx.load(str(tmp))
            onnx.checker.check_model(proto)
            for key, value in (metadata or {}).items():
                entry = proto.metadata_props.add()
                entry.key, entry.value = key, value
            with atomic_output(tmp) as f:
                f.write(proto.SerializeToString())
        except BenchError:
            raise
        except OSError as exc:
            raise cannot_write(path, exc) from None
        except Exception as exc:  # the exporter raises many types; one line naming the failure
            raise BenchError(f"ONNX export to {path} failed: {str(exc).splitlines()[0][:300]}") from None
        export_s = time.perf_counter() - began
        session = onnx_session(tmp)
        (theirs,) = session.run([OUTPUT], {INPUT: x.numpy()})
        with torch.inference_mode():
            ours = model(x).float().numpy()
        if theirs.shape != ours.shape:
            tmp.replace(path.with_name(path.name + ".rejected"))
            raise BenchError(f"ONNX export {path}: onnxruntime gives {theirs.shape}, PyTorch {ours.shape}; kept as "
                             f"{path.name}.rejected")
        largest = float(np.abs(ours).max())
        diff = float(np.abs(theirs - ours).max())
        bound = TOLERANCE * max(1.0, largest)
        if not diff <= bound:
            tmp.replace(path.with_name(path.name + ".rejected"))
            raise BenchError(f"ONNX export {path}: onnxruntime differs from PyTorch by {diff:.2e} (bound "
                             f"{bound:.1e}); kept as {path.name}.rejected")
        try:
            tmp.replace(path)
        except OSError as exc:
            raise cannot_write(path, exc) from None
    finally:
        tmp.unlink(missing_ok=True)
    operators = sorted({node.op_type for node in proto.graph.node})
    return OnnxExport(path, opset, size, diff, bound, largest, operators, check, export_s)


def cannot_write(path: Path, exc: OSError) -> BenchError:
    """A write of an export that failed (a read-only folder, a full disk), in one line with the fix."""
    return BenchError(f"cannot write {path} ({exc.strerror or exc}); pass --out FILE in a writable folder with room "
                      "for it")


def onnx_metadata(path: Path) -> dict[str, str]:
    """The key-value metadata of an ONNX file (what `export_onnx` wrote: row, plan, normalisation)."""
    onnx, _ = require_onnx()
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise BenchError(f"{path} is no readable ONNX file ({str(exc).splitlines()[0][:200]})") from None
    return {entry.key: entry.value for entry in proto.metadata_props}


def onnx_input_size(session: Any) -> tuple[int, int]:
    """[width, height] of an ONNX model's fixed image size."""
    shape = session.get_inputs()[0].shape
    if len(shape) != 4 or not all(isinstance(d, int) for d in shape[2:]):
        raise BenchError(f"the ONNX model's input is {shape}: expected N x 3 x H x W with a fixed H and W")
    return int(shape[3]), int(shape[2])


def time_onnx(session: Any, batch: int, warmup: int, repeats: int, steps: int) -> list[float]:
    """Seconds per onnxruntime inference of `batch` images, one figure per repeat of `steps` runs."""
    width, height = onnx_input_size(session)
    feed = {session.get_inputs()[0].name: check_batch((width, height), batch).numpy()}
    for _ in range(warmup):
        session.run(None, feed)
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        for _ in range(steps):
            session.run(None, feed)
        times.append((time.perf_counter() - began) / steps)
    return times


# --- safetensors ------------------------------------------------------------------------------------------------


def export_safetensors(model: nn.Module, path: Path, metadata: dict[str, str]) -> Path:
    """The network's tensors (its state dict: parameters and batch-norm buffers, nothing of the optimizer or the
    EMA bookkeeping) as safetensors, with `metadata` (text values) in its header; written atomically."""
    from safetensors.torch import save

    tensors = {name: tensor.detach().cpu().contiguous().clone() for name, tensor in model.state_dict().items()}
    path = Path(path)
    data = save(tensors, metadata={k: str(v) for k, v in metadata.items()})
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(path) as f:
            f.write(data)
    except OSError as exc:
        raise cannot_write(path, exc) from None
    return path


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {name: f.get_tensor(name) for name in f.keys()}, dict(f.metadata() or {})
    except Exception as exc:  # safetensors raises its own error type for a damaged header
        raise BenchError(f"{path} is no readable safetensors file ({str(exc).splitlines()[0][:200]})") from None


def export_metadata(row: str, weights: str, plan: dict[str, Any], checkpoint: Path) -> dict[str, str]:
    """What both formats carry: the row, which weights, the checkpoint and the plan (its normalisation included)."""
    return {"segbench.row": row, "segbench.weights": weights, "segbench.checkpoint": str(checkpoint),
            "segbench.plan": json.dumps(plan, sort_keys=True), "segbench.mean": json.dumps(plan.get("mean")),
            "segbench.std": json.dumps(plan.get("std")), "segbench.classes": "19 Cityscapes train ids"}
