"""segbench from Python: a row's spec, its network, a trained checkpoint, and predictions as train ids.

    from harness import api

    model = api.load_checkpoint("runs/cityscapes/sf_seg_v2-ema/20261125-101500/checkpoints/best.pt")
    train_ids = api.predict(model, image)   # image: H x W x 3 uint8 RGB (numpy, PIL or a file path)

`predict` runs what `bench eval` runs on one image: resized to the row's test size, normalised with the row's
mean and std, the row's test mode (whole image, or sliding window, flips and scales where the row says so), the
logits resized back to the image's size, argmax. Everything here is a thin layer over the commands' own code.

    record = api.run(api.RunOptions(row="sf_seg_v2", synthetic=True))   # train one seed, as `bench run` does
    print(record.miou, record.checkpoint)                              # its result record, an api.TrainRecord

`run` is `bench run`'s own way in (harness.launch.run.checked_run): the same checks, the same refusals.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import nn

from harness.config.benchmark import OFFICIAL_SPLIT_IMAGES, REFERENCE_DATASET
from harness.config.plan import TrainPlan, make_plan, scaled_test_crop, size_pair
from harness.config.spec import Spec, load_spec
from harness.data.augment import EvalTransform
from harness.engine.evaluate import TestMode, infer_logits
from harness.engine.trained import load_trained_state
from harness.errors import BenchError
from harness.launch.run import RunOptions, run
from harness.models import build_model as build_network
from harness.models import check_implemented
from harness.report.records import TrainRecord

__all__ = ["RunOptions", "Segmenter", "TrainRecord", "build_model", "load_checkpoint", "load_row", "predict", "run"]


class Segmenter(nn.Module):
    """A row's network with what predicting needs: its spec and the plan it is evaluated by (test size, test mode,
    normalisation). Called on normalised N x 3 x H x W images it returns the network's logits."""

    def __init__(self, network: nn.Module, spec: Spec, plan: TrainPlan, weights: str):
        super().__init__()
        self.network, self.spec, self.plan, self.weights = network, spec, plan, weights

    @property
    def row(self) -> str:
        return self.spec.row

    def forward(self, images: torch.Tensor) -> Any:
        return self.network(images)


def _checked(function: str, argument: str, value: Any, types: tuple[type, ...], expected: str) -> None:
    """A Python caller's argument of the wrong type is one line naming the function, the argument and what it takes
    (the CLI's BenchError), not a TypeError from deep inside."""
    if not isinstance(value, types) or (isinstance(value, str) and not value.strip()):
        shown = repr(value) if isinstance(value, str) else type(value).__name__
        raise BenchError(f"{function}: {argument} must be {expected}, got {shown}")


ROW_ID = "a row id (text, e.g. 'sf_seg_v2'; `bench list` shows them)"


def load_row(name: str) -> Spec:
    """The resolved spec of a row (a table row or one of ours), as `bench show` prints it."""
    _checked("load_row", "name", name, (str,), ROW_ID)
    return load_spec(name)


def _evaluation_plan(spec: Spec, test_size: Optional[list[int]] = None) -> TrainPlan:
    """The row's Cityscapes plan, at `test_size` when the weights were trained for another (a synthetic run)."""
    plan = make_plan(spec, REFERENCE_DATASET, OFFICIAL_SPLIT_IMAGES["train"])
    if test_size is None or list(test_size) == list(plan.test_size):
        return plan
    crop, stride = scaled_test_crop(spec, list(test_size))
    return replace(plan, test_size=list(test_size), crop_test=crop, crop_stride=stride)


def build_model(row: Union[str, Spec]) -> Segmenter:
    """The row's network in eval mode, at its initial weights (random, or nothing loaded: see `load_checkpoint`)."""
    _checked("build_model", "row", row, (str, Spec), f"{ROW_ID} or a Spec from load_row")
    spec = load_spec(row) if isinstance(row, str) else row
    check_implemented(spec)
    return Segmenter(build_network(spec), spec, _evaluation_plan(spec), "initial").eval()


def load_checkpoint(path: Union[str, Path], weights: str = "ema", row: Optional[str] = None) -> Segmenter:
    """A segbench checkpoint's network (CPU, eval mode) with its EMA or raw weights, for the checkpoint's row (or
    `row`); evaluated at the test size it was trained for. A checkpoint of a row without EMA has only raw weights:
    pass weights="raw"."""
    _checked("load_checkpoint", "path", path, (str, Path), "a checkpoint's path (text or pathlib.Path)")
    if weights not in ("ema", "raw"):
        raise BenchError(f"load_checkpoint: weights must be 'ema' or 'raw', got {weights!r}")
    if row is not None:
        _checked("load_checkpoint", "row", row, (str,), ROW_ID)
    spec, network, chosen, state = load_trained_state(path, row, weights)
    test_size = (state.get("plan") or {}).get("test_size")
    return Segmenter(network, spec, _evaluation_plan(spec, test_size), chosen).eval()


def _as_image(image: Any) -> torch.Tensor:
    """An H x W x 3 uint8 tensor from a numpy array, a PIL image, a tensor or an image file."""
    if isinstance(image, (str, Path)):
        from PIL import Image

        try:
            with Image.open(image) as opened:
                image = np.asarray(opened.convert("RGB"))
        except OSError as exc:
            raise BenchError(f"cannot read image {image} ({exc})") from None
    elif not isinstance(image, (np.ndarray, torch.Tensor)) and hasattr(image, "convert"):  # a PIL image
        image = np.asarray(image.convert("RGB"))
    tensor = torch.from_numpy(np.array(image)) if isinstance(image, np.ndarray) else image  # a copy: writable
    if not isinstance(tensor, torch.Tensor) or tensor.dim() != 3 or tensor.shape[-1] != 3:
        shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(image).__name__
        raise BenchError(f"predict: expected an H x W x 3 RGB image, got {shape}")
    if tensor.dtype != torch.uint8:
        raise BenchError(f"predict: expected uint8 RGB values 0-255, got {tensor.dtype}")
    if tensor.shape[0] < 1 or tensor.shape[1] < 1:
        raise BenchError(f"predict: the image is empty ({tensor.shape[0]} x {tensor.shape[1]} pixels); give an image "
                         "of at least one pixel")
    return tensor


def _as_device(device: Any, model: Segmenter) -> torch.device:
    """The device to predict on: `device` as given (text or torch.device), else the model's."""
    if device is None:
        return next(model.parameters()).device
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise BenchError(f"predict: device {device!r} is no device; give 'cpu', 'cuda' or 'cuda:N'") from None


def predict(model: Segmenter, image: Any, device: Optional[Union[str, torch.device]] = None) -> np.ndarray:
    """Train ids (H x W uint8, 0-18) of one RGB image at its own size, as `bench eval` predicts it."""
    if not isinstance(model, Segmenter):
        raise BenchError("predict: give a model from harness.api.build_model or harness.api.load_checkpoint")
    pixels = _as_image(image)
    target = _as_device(device, model)
    model = model.to(target).eval()
    plan = model.plan
    transform = EvalTransform(size_pair(plan.test_size), tuple(plan.mean), tuple(plan.std))
    with torch.inference_mode():
        size = (int(pixels.shape[0]), int(pixels.shape[1]))
        logits = infer_logits(model.network, transform(pixels, target), size,
                              TestMode.from_plan(plan), plan.precision)
    return logits.argmax(1)[0].to(torch.uint8).cpu().numpy()
