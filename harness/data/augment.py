"""Training augmentation and evaluation input, split where each part is cheapest.

Loader workers only decode: a uint8 image, a uint8 label of labelIds as stored and, for training, the sample's
augmentation *draw* (`Draw`: UP's seg_rand_resize scale, the flip, the crop window), taken from a `random.Random`
seeded by the sample's (seed, epoch, index) key, so a sample's augmentation depends on that key alone, on any number
of processes or workers and after a resume. The arithmetic (scale, flip, pad, crop, labelIds to trainIds,
normalisation; the evaluation resize) runs on the training device in the training process (`TrainTransform`,
`EvalTransform`): on a GPU it costs milliseconds per batch where the CPU needed a worker-second per image.

The order is UP's: scale the whole image (bilinear, sizes truncated to int), flip, pad on the right/bottom with
`pad_value` (a 0-255 pixel value, before normalisation) and the ignore label, crop, then normalise with the
ImageNet statistics on 0-255 values.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple, Optional, Protocol

import torch
import torch.nn.functional as F

from harness.config.precision import resolve_compute
from harness.data.labels import IGNORE_INDEX, train_ids_of


class Rng(Protocol):
    """What the draws need of a generator: a `random.Random`, or the `random` module itself (unseeded keys)."""

    def random(self) -> float: ...

    def randint(self, a: int, b: int) -> int: ...


def up_scale(rng: Rng, low: float, high: float) -> float:
    """UP's seg_rand_resize draw: half the time uniform in [low, 1), half in [1, high)."""
    if rng.random() < 0.5:
        return low + (1.0 - low) * rng.random()
    return 1.0 + (high - 1.0) * rng.random()


@dataclass(frozen=True)
class Draw:
    """One sample's augmentation: the scaled size, the flip and the crop window's corner in the scaled image
    (padded on the right/bottom to at least the crop)."""

    height: int
    width: int
    flip: bool
    top: int
    left: int

    def as_tensor(self) -> torch.Tensor:
        return torch.tensor([self.height, self.width, int(self.flip), self.top, self.left], dtype=torch.int64)


def draw_augmentation(rng: Rng, image_hw: Sequence[int], crop_size: Sequence[int],
                      scale_range: Sequence[float], flip: bool) -> Draw:
    """The draws in UP's order: scale, flip (only when flipping is on), crop top, crop left."""
    crop_w, crop_h = crop_size
    scale = up_scale(rng, *scale_range)
    height, width = max(1, int(image_hw[0] * scale)), max(1, int(image_hw[1] * scale))
    flipped = flip and rng.random() < 0.5
    top = rng.randint(0, max(height, crop_h) - crop_h)
    left = rng.randint(0, max(width, crop_w) - crop_w)
    return Draw(height, width, flipped, top, left)


class RawBatch(NamedTuple):
    """What a training loader yields: per-sample decoded tensors (frames may differ in size) and their draws.
    A NamedTuple of lists so the DataLoader pins every tensor."""

    images: list[torch.Tensor]  # uint8 HxWx3
    labels: list[torch.Tensor]  # uint8 HxW labelIds as stored (TrainTransform maps them to trainIds)
    draws: torch.Tensor  # int64 (N, 5): Draw.as_tensor of each sample


def collate_raw(items: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> RawBatch:
    images, labels, draws = zip(*items)
    return RawBatch(list(images), list(labels), torch.stack(draws))


def _channel_stats(values: Sequence[float], device: torch.device) -> torch.Tensor:
    return torch.tensor([float(v) for v in values], dtype=torch.float32, device=device).view(1, 3, 1, 1)


def to_float_nchw(image: torch.Tensor) -> torch.Tensor:
    """uint8 HxWx3 -> float 1x3xHxW on 0-255 values (channels-last strides, which interpolate keeps)."""
    return image.permute(2, 0, 1).unsqueeze(0).float()


def channels_last(requested: Optional[bool], device: torch.device) -> bool:
    return resolve_compute(device.type, channels_last=requested).channels_last


@dataclass(frozen=True)
class TrainTransform:
    """A RawBatch -> (normalised float images N x 3 x crop_h x crop_w, int64 trainIds N x crop_h x crop_w, 255
    ignored), on `device`."""

    crop_size: tuple[int, int]  # [width, height]
    pad_value: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    channels_last: Optional[bool] = None  # the memory format of the images; default: the device's (Compute)

    def __call__(self, batch: RawBatch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        device = torch.device(device)
        crop_w, crop_h = self.crop_size
        count = len(batch.images)
        images = torch.full((count, 3, crop_h, crop_w), float(self.pad_value), device=device)
        labels = torch.full((count, crop_h, crop_w), IGNORE_INDEX, dtype=torch.uint8, device=device)
        for i, (image, label, values) in enumerate(zip(batch.images, batch.labels, batch.draws.tolist())):
            height, width, flip, top, left = values
            image = to_float_nchw(image.to(device, non_blocking=True))
            label = label.to(device, non_blocking=True)[None, None]
            if (height, width) != tuple(image.shape[-2:]):
                image = F.interpolate(image, size=(height, width), mode="bilinear", align_corners=False)
                label = F.interpolate(label, size=(height, width), mode="nearest")
            if flip:
                image, label = image.flip(-1), label.flip(-1)
            # The crop window may reach past the scaled image (the padding): copy only the part the image covers.
            rows, cols = max(0, min(crop_h, height - top)), max(0, min(crop_w, width - left))
            images[i, :, :rows, :cols] = image[0, :, top : top + rows, left : left + cols]
            labels[i, :rows, :cols] = train_ids_of(label[0, 0, top : top + rows, left : left + cols])
        images.sub_(_channel_stats(self.mean, device)).div_(_channel_stats(self.std, device))
        if channels_last(self.channels_last, device):
            images = images.contiguous(memory_format=torch.channels_last)
        return images, labels.long()


@dataclass(frozen=True)
class EvalTransform:
    """A decoded uint8 HxWx3 image -> the normalised 1x3xHxW float input at the test size, on `device`."""

    test_size: tuple[int, int]  # [width, height]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    channels_last: Optional[bool] = None  # the memory format of the input; default: the device's (Compute)

    def __call__(self, image: torch.Tensor, device: torch.device) -> torch.Tensor:
        device = torch.device(device)
        image = to_float_nchw(image.to(device, non_blocking=True))
        test_w, test_h = self.test_size
        if tuple(image.shape[-2:]) != (test_h, test_w):
            image = F.interpolate(image, size=(test_h, test_w), mode="bilinear", align_corners=False)
        image = (image - _channel_stats(self.mean, device)) / _channel_stats(self.std, device)
        if channels_last(self.channels_last, device):
            return image.contiguous(memory_format=torch.channels_last)
        return image.contiguous()
