"""Evaluation the way Cityscapes scores it, one image at a time into a confusion matrix on the device.

One loop (`evaluate`) serves training-time evaluation, `bench eval`, `bench predict` and `bench speed`: images
arrive decoded as uint8 (loader workers decode the next ones meanwhile), are resized to the test size and normalised
on the device, predicted by one or several models (raw and EMA weights share a pass), and scored there at the ground
truth's size; writing prediction files and panels are sinks of the same loop (harness.outputs).

Test modes (`TestMode`, built from a plan by `TestMode.from_plan`):
- whole image (the default, as the table): the image at the test size, logits resized to the ground truth;
- sliding window ("crop test"): crops of `crop_size` every `stride` pixels, overlapping logits averaged,
  the image padded on the right/bottom when it is smaller than a crop;
- horizontal flip and several scales: logits of every view are resized to the ground truth and averaged.

Only one image's logits exist at a time, so 500 images at 2048x1024 need the memory of one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from harness.config.plan import TrainPlan
from harness.config.precision import autocast_dtype
from harness.data.augment import EvalTransform
from harness.data.cityscapes import NUM_CLASSES, Sample
from harness.data.labels import train_ids_of
from harness.data.loaders import batches
from harness.engine.metrics import ConfusionMatrix, SegMetrics
from harness.errors import BenchError
from harness.logs import bar_fits

DEFAULT_STRIDE_FRACTION = 2 / 3  # of the crop, when the spec gives no stride (mmsegmentation's 769/513)

Reduce = Callable[[torch.Tensor], None]  # e.g. an all-reduce sum of the confusion matrix across ranks


# --- test modes ----------------------------------------------------------------------------------


def _positive_pair(value: Optional[Sequence[int]], name: str) -> Optional[tuple[int, int]]:
    if value is None:
        return None
    pair = tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in pair):
        raise BenchError(f"{name} {list(pair)}: expected [width, height], two positive integers")
    return pair[0], pair[1]


@dataclass(frozen=True)
class TestMode:
    """How an image becomes logits. Sizes are (width, height) in pixels of the image fed to the model."""

    crop_size: Optional[tuple[int, int]] = None  # None: whole-image inference
    crop_stride: Optional[tuple[int, int]] = None  # None: 2/3 of the crop
    flip: bool = False
    scales: tuple[float, ...] = (1.0,)

    __test__ = False  # not a pytest test class, despite the name

    def __post_init__(self) -> None:
        crop = _positive_pair(self.crop_size, "columns.crop_test")
        stride = _positive_pair(self.crop_stride, "eval.crop_stride")
        if stride is not None and crop is None:
            raise BenchError(f"eval.crop_stride {list(stride)} is set but columns.crop_test is null (whole-image "
                             "inference); set columns.crop_test or remove eval.crop_stride")
        if crop is not None and stride is not None and (stride[0] > crop[0] or stride[1] > crop[1]):
            # A stride larger than the crop leaves pixels no window covers.
            raise BenchError(f"eval.crop_stride {list(stride)} is larger than columns.crop_test {list(crop)}; "
                             "use a stride no larger than the crop")
        scales = tuple(float(s) for s in self.scales)
        if not scales or not all(math.isfinite(s) and s > 0 for s in scales):
            raise BenchError(f"eval.scales {list(self.scales)}: expected one or more positive numbers, e.g. [1.0]")
        object.__setattr__(self, "crop_size", crop)
        object.__setattr__(self, "crop_stride", stride)
        object.__setattr__(self, "scales", scales)

    @property
    def stride(self) -> Optional[tuple[int, int]]:
        """The sliding-window stride in use: the given one, or 2/3 of the crop."""
        if self.crop_size is None:
            return None
        if self.crop_stride is not None:
            return self.crop_stride
        return tuple(max(1, math.ceil(c * DEFAULT_STRIDE_FRACTION)) for c in self.crop_size)  # type: ignore[return-value]

    @property
    def views(self) -> int:
        """Forward passes of the whole image averaged per image (windows not counted)."""
        return len(self.scales) * (2 if self.flip else 1)

    def describe(self) -> str:
        """A short label for logs and MLflow params, e.g. 'slide 1024x1024/683x683 +flip scales 0.75,1,1.25'."""
        crop, stride = self.crop_size, self.stride
        parts = ["whole" if crop is None or stride is None else f"slide {crop[0]}x{crop[1]}/{stride[0]}x{stride[1]}"]
        if self.flip:
            parts.append("+flip")
        if self.scales != (1.0,):
            parts.append("scales " + ",".join(f"{s:g}" for s in self.scales))
        return " ".join(parts)

    @classmethod
    def from_plan(cls, plan: TrainPlan) -> TestMode:
        """The row's test mode at the plan's test size (harness.config.plan scales a crop test to it)."""
        try:
            return cls(crop_size=plan.crop_test, crop_stride=plan.crop_stride,  # type: ignore[arg-type]
                       flip=plan.eval_flip, scales=tuple(plan.eval_scales))
        except BenchError as exc:
            raise BenchError(f"row '{plan.row}': {exc}") from None


WHOLE_IMAGE = TestMode()


# --- inference -----------------------------------------------------------------------------------


def _forward(model: nn.Module, images: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.Tensor:
    with torch.autocast(images.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        logits = model(images)
    logits = logits.float()  # averaging and resizing in fp32, whatever the forward ran in
    if logits.shape[-2:] != images.shape[-2:]:
        logits = F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)
    return logits


def window_starts(length: int, crop: int, stride: int) -> list[int]:
    """Window offsets along one axis: every `stride`, and a last window flush with the far edge."""
    if length <= crop:
        return [0]
    return list(range(0, length - crop, stride)) + [length - crop]


def _slide(model: nn.Module, images: torch.Tensor, crop: tuple[int, int], stride: tuple[int, int],
           dtype: Optional[torch.dtype]) -> torch.Tensor:
    height, width = images.shape[-2:]
    crop_w, crop_h = crop
    pad_h, pad_w = max(crop_h - height, 0), max(crop_w - width, 0)
    if pad_h or pad_w:
        # Zero is the mean colour after normalisation; the padded logits are cut away below.
        images = F.pad(images, (0, pad_w, 0, pad_h), value=0.0)
    padded_h, padded_w = images.shape[-2:]
    total: Optional[torch.Tensor] = None
    count = torch.zeros((1, 1, padded_h, padded_w), device=images.device)
    for top in window_starts(padded_h, crop_h, stride[1]):
        for left in window_starts(padded_w, crop_w, stride[0]):
            logits = _forward(model, images[..., top : top + crop_h, left : left + crop_w], dtype)
            if total is None:
                total = logits.new_zeros((images.shape[0], logits.shape[1], padded_h, padded_w))
            total[..., top : top + crop_h, left : left + crop_w] += logits
            count[..., top : top + crop_h, left : left + crop_w] += 1
    assert total is not None  # every image has at least one window
    return (total / count)[..., :height, :width]


@torch.no_grad()
def infer_logits(model: nn.Module, images: torch.Tensor, out_size: tuple[int, int],
                 mode: TestMode = WHOLE_IMAGE, precision: str = "fp32") -> torch.Tensor:
    """Float32 logits (N, C, *out_size) for normalised images (N, 3, H, W), averaged over the mode's views.

    The model must already be in eval mode. `out_size` is the ground truth's (height, width).
    """
    dtype = autocast_dtype(precision)
    out_size = (int(out_size[0]), int(out_size[1]))
    height, width = images.shape[-2:]
    total: Optional[torch.Tensor] = None
    for scale in mode.scales:
        scaled = images
        if scale != 1.0:
            size = (max(1, round(height * scale)), max(1, round(width * scale)))
            scaled = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        for flipped in (False, True) if mode.flip else (False,):
            view = scaled.flip(-1) if flipped else scaled
            crop, stride = mode.crop_size, mode.stride
            if crop is None or stride is None:
                logits = _forward(model, view, dtype)
            else:
                logits = _slide(model, view, crop, stride, dtype)
            if flipped:
                logits = logits.flip(-1)
            if tuple(logits.shape[-2:]) != out_size:
                logits = F.interpolate(logits, size=out_size, mode="bilinear", align_corners=False)
            total = logits if total is None else total.add_(logits)
    assert total is not None  # a mode has at least one view
    return total / mode.views if mode.views > 1 else total


# --- the evaluation loop -------------------------------------------------------------------------


class _EvalModes:
    """Eval mode inside the block, each model's previous mode after it (the training loop relies on this)."""

    def __init__(self, models: Sequence[nn.Module]):
        self.models, self.was_training = list(models), [m.training for m in models]

    def __enter__(self) -> None:
        for model in self.models:
            model.eval()

    def __exit__(self, *exc) -> None:
        for model, was_training in zip(self.models, self.was_training):
            model.train(was_training)


@dataclass
class Scored:
    """One image's prediction as the loop hands it to its sinks."""

    index: int  # position in the loader's samples
    sample: Sample
    image: torch.Tensor  # the decoded uint8 HxWx3 image (CPU)
    prediction: torch.Tensor  # HxW trainIds at the ground truth's size (the image's when unlabelled), on the device
    label: torch.Tensor  # HxW uint8 trainIds on the device, empty when unlabelled


Sink = Callable[[Scored], None]


@torch.no_grad()
def evaluate(models: Mapping[str, nn.Module], loader: DataLoader, device: torch.device, transform: EvalTransform, *,
             mode: TestMode = WHOLE_IMAGE, precision: str = "fp32", num_classes: int = NUM_CLASSES,
             reduce: Optional[Reduce] = None, sinks: Sequence[Sink] = (), score: bool = True,
             progress: bool = True, desc: str = "eval") -> dict[str, SegMetrics]:
    """The one evaluation loop: every image of `loader` (an `eval_loader`) goes to the device as uint8, is resized
    and normalised there (`transform`), predicted by each of `models` in the test `mode`, and scored into a
    confusion matrix on the device at the ground truth's size. Several models (raw and EMA weights) share one pass
    over the data. `sinks` (one model only) receive each prediction: files, panels. `reduce` sums the ranks'
    matrices. Returns the metrics per model name ({} when `score` is False: predicting an unlabelled split)."""
    device = torch.device(device)
    samples = loader.dataset.samples  # type: ignore[attr-defined]  # a CityscapesEval
    if sinks and len(models) != 1:
        raise ValueError("prediction sinks take the predictions of exactly one model")
    if score:
        unlabelled = next((s for s in samples if s.label is None), None)
        if unlabelled is not None:
            raise BenchError(f"no ground truth for {unlabelled.image}; evaluate a labelled split (val), "
                             "or write predictions with `bench predict`")
    matrices = {name: ConfusionMatrix(num_classes, device=device) for name in models} if score else {}
    with _EvalModes(list(models.values())):
        shown = progress and bar_fits()
        for image, label, index in tqdm(batches(loader), desc=desc, total=len(loader), disable=not shown, leave=False,
                                        dynamic_ncols=True):
            inputs = transform(image, device)
            label = train_ids_of(label.to(device, non_blocking=True))  # the loader's labelIds
            height, width = label.shape if label.numel() else image.shape[:2]
            for name, model in models.items():
                prediction = infer_logits(model, inputs, (height, width), mode, precision).argmax(1)[0]
                if score:
                    matrices[name].update(prediction, label)
                for sink in sinks:
                    sink(Scored(int(index), samples[int(index)], image, prediction, label))
    for matrix in matrices.values():
        if reduce is not None:
            reduce(matrix.matrix)
    return {name: matrix.compute() for name, matrix in matrices.items()}
