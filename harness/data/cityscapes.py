"""Cityscapes in its official layout, with the official labelId -> trainId mapping.

    <root>/leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    <root>/gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from harness.errors import BenchError

IGNORE_INDEX = 255
NUM_CLASSES = 19

CLASS_NAMES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
)
# labelId of each trainId (cityscapesscripts' labels.py).
TRAIN_ID_TO_LABEL_ID = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)
PALETTE = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
    (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
)

LABEL_TO_TRAIN = np.full(256, IGNORE_INDEX, dtype=np.uint8)
for _train_id, _label_id in enumerate(TRAIN_ID_TO_LABEL_ID):
    LABEL_TO_TRAIN[_label_id] = _train_id

# ImageNet statistics on 0-255 RGB (UP's `normalize`); specs carry them as data.mean / data.std.
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)

IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelIds.png"


def label_ids_to_train_ids(label_ids: np.ndarray) -> np.ndarray:
    return LABEL_TO_TRAIN[label_ids]


def train_ids_to_label_ids(train_ids: np.ndarray) -> np.ndarray:
    lut = np.zeros(256, dtype=np.uint8)
    lut[: len(TRAIN_ID_TO_LABEL_ID)] = TRAIN_ID_TO_LABEL_ID
    return lut[train_ids]


@dataclass(frozen=True)
class Sample:
    image: Path
    label: Optional[Path]  # None for the test split, whose labels are withheld

    @property
    def stem(self) -> str:
        return self.image.name[: -len(IMAGE_SUFFIX)]

    @property
    def city(self) -> str:
        return self.image.parent.name


def check_root(root: Path) -> Path:
    """The dataset folder, or a one-line error saying what it is instead."""
    root = Path(root)
    fix = "pass --data-root (or set CITYSCAPES_DATASET) to the folder holding leftImg8bit/ and gtFine/"
    if root.is_file():
        raise BenchError(f"Cityscapes root {root} is a file, not a folder; {fix}")
    if not root.is_dir():
        raise BenchError(f"Cityscapes root {root} does not exist; {fix}")
    return root


def find_samples(root: Path, split: str, require_labels: bool = True) -> list[Sample]:
    """Every image of a split with its ground truth; one clear error for anything missing."""
    root = check_root(root)
    expected = f"{root}/leftImg8bit/{split}/<city>/*{IMAGE_SUFFIX}"
    images = sorted((root / "leftImg8bit" / split).glob(f"*/*{IMAGE_SUFFIX}"))
    if not images:
        raise BenchError(f"no Cityscapes images found: expected {expected}")
    samples = []
    for image in images:
        stem = image.name[: -len(IMAGE_SUFFIX)]
        label = root / "gtFine" / split / image.parent.name / f"{stem}{LABEL_SUFFIX}"
        if not label.is_file():
            if require_labels:
                raise BenchError(f"missing ground truth {label} for image {image}; expected gtFine beside leftImg8bit")
            label = None
        samples.append(Sample(image, label))
    return samples


# Cityscapes frames are 2048x1024; anything beyond this is a wrong file, and decoding it could exhaust memory
# (PIL's decompression-bomb guard would raise a traceback at twice its own 89-Mpixel limit).
MAX_PIXELS = 64_000_000
# Label PNGs hold one labelId per pixel: 8-bit grey ("L"), or a palette ("P") whose indices are the ids.
LABEL_MODES = ("L", "P")


@dataclass(frozen=True)
class PngHeader:
    width: int
    height: int
    mode: str


def read_header(path: Path) -> PngHeader:
    """Size and mode from the file's header, without decoding its pixels."""
    try:
        with Image.open(path) as img:
            return PngHeader(img.width, img.height, img.mode)
    except Image.DecompressionBombError:
        raise BenchError(f"image {path} is too large to be a Cityscapes frame (beyond PIL's decompression limit); "
                         "replace or remove it") from None
    except (OSError, ValueError) as exc:
        raise BenchError(f"cannot read image {path} ({exc}); replace or remove it") from None


def check_image_header(path: Path, header: PngHeader) -> None:
    if header.width < 1 or header.height < 1 or header.width * header.height > MAX_PIXELS:
        raise BenchError(f"image {path} is {header.width}x{header.height}, not a sane Cityscapes frame size "
                         f"(at most {MAX_PIXELS // 1_000_000} Mpixel; Cityscapes frames are 2048x1024); replace or remove it")


def check_pair_headers(sample: Sample) -> None:
    """One image/label pair is usable: sane size, same size, a single-channel labelIds PNG (headers only)."""
    image = read_header(sample.image)
    check_image_header(sample.image, image)
    if sample.label is None:
        return
    label = read_header(sample.label)
    check_image_header(sample.label, label)
    if (label.width, label.height) != (image.width, image.height):
        raise BenchError(f"label {sample.label} is {label.width}x{label.height} but its image is "
                         f"{image.width}x{image.height}; each labelIds PNG must have its image's size")
    if label.mode not in LABEL_MODES:
        raise BenchError(f"label {sample.label} is a {label.mode} image, not an 8-bit single-channel labelIds PNG "
                         f"(a colour *_gtFine_color.png in its place?); use the *{LABEL_SUFFIX} files")


def check_pairs(samples: Sequence[Sample], threads: int = 8) -> None:
    """Check every pair's headers before training starts, in threads (file opens dominate, not decoding)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=threads) as pool:
        for _ in pool.map(check_pair_headers, samples):
            pass


def _read_png(path: Path, mode: str) -> np.ndarray:
    header = read_header(path)
    check_image_header(path, header)
    if mode == "L" and header.mode not in LABEL_MODES:
        raise BenchError(f"label {path} is a {header.mode} image, not an 8-bit single-channel labelIds PNG; "
                         f"use the *{LABEL_SUFFIX} files")
    try:
        with Image.open(path) as img:
            if mode == "L" and img.mode in LABEL_MODES:
                return np.asarray(img)  # a palette label's indices are its labelIds: never map them to grey levels
            return np.asarray(img.convert(mode) if img.mode != mode else img)
    except (OSError, ValueError) as exc:
        raise BenchError(f"cannot read image {path}: {exc}") from None


def _same_size(label: torch.Tensor, image_hw: tuple[int, int], path: Path) -> None:
    if tuple(label.shape) != tuple(image_hw):
        raise BenchError(f"label {path} is {label.shape[1]}x{label.shape[0]} but its image is "
                         f"{image_hw[1]}x{image_hw[0]}; each labelIds PNG must have its image's size")


def load_image(path: Path, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """uint8 HxWx3 file -> normalised float 3xHxW tensor ((pixel - mean) / std on 0-255 values)."""
    return normalize(torch.from_numpy(_read_png(path, "RGB").copy()).permute(2, 0, 1).float(), mean, std)


def normalize(image: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    return (image - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def up_scale(rng: random.Random, low: float, high: float) -> float:
    """UP's seg_rand_resize draw: half the time uniform in [low, 1), half in [1, high)."""
    if rng.random() < 0.5:
        return low + (1.0 - low) * rng.random()
    return 1.0 + (high - 1.0) * rng.random()


def load_train_ids(path: Path) -> torch.Tensor:
    label_ids = _read_png(path, "L")
    return torch.from_numpy(label_ids_to_train_ids(label_ids).astype(np.int64))


def _resize(image: torch.Tensor, label: Optional[torch.Tensor], size_hw: tuple[int, int]):
    image = F.interpolate(image[None], size=size_hw, mode="bilinear", align_corners=False)[0]
    if label is not None:
        label = F.interpolate(label[None, None].float(), size=size_hw, mode="nearest")[0, 0].long()
    return image, label


class CityscapesTrain(Dataset):
    """Training samples as UP's transforms make them: random scale of the full image (seg_rand_resize, sizes
    truncated to int), random horizontal flip, random crop padded on the right/bottom with `pad_value`
    (a 0-255 pixel value, before normalisation) and the ignore label."""

    def __init__(self, samples: list[Sample], crop_size: list[int], scale_range: list[float], flip: bool = True,
                 pad_value: int = 0, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        self.samples = samples
        self.crop_w, self.crop_h = crop_size
        self.scale_range = scale_range
        self.flip, self.mean, self.std = flip, mean, std
        self.pad = normalize(torch.full((3, 1, 1), float(pad_value)), mean, std)  # the padding, normalised

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        # A (index, seed) key makes the augmentation a function of the key alone: the same on any
        # number of processes or workers, and after a resume (see distributed.ShardedTrainSampler).
        index, seed = key if isinstance(key, tuple) else (key, None)
        rng = random.Random(seed) if seed is not None else random
        sample = self.samples[index]
        image, label = load_image(sample.image, self.mean, self.std), load_train_ids(sample.label)
        _same_size(label, tuple(image.shape[1:]), sample.label)
        scale = up_scale(rng, *self.scale_range)
        height, width = label.shape
        image, label = _resize(image, label, (max(1, int(height * scale)), max(1, int(width * scale))))
        if self.flip and rng.random() < 0.5:
            image, label = image.flip(-1), label.flip(-1)
        pad_h, pad_w = max(self.crop_h - label.shape[0], 0), max(self.crop_w - label.shape[1], 0)
        if pad_h or pad_w:
            padded = self.pad.expand(3, label.shape[0] + pad_h, label.shape[1] + pad_w).clone()
            padded[:, : label.shape[0], : label.shape[1]] = image
            image = padded
            label = F.pad(label, (0, pad_w, 0, pad_h), value=IGNORE_INDEX)
        top = rng.randint(0, label.shape[0] - self.crop_h)
        left = rng.randint(0, label.shape[1] - self.crop_w)
        image = image[:, top : top + self.crop_h, left : left + self.crop_w]
        label = label[top : top + self.crop_h, left : left + self.crop_w]
        return image.contiguous(), label.contiguous()


class CityscapesEval(Dataset):
    """Whole images resized to the test size; labels stay at full resolution, as the official evaluator scores."""

    def __init__(self, samples: list[Sample], test_size: list[int], mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD):
        self.samples = samples
        self.test_w, self.test_h = test_size
        self.mean, self.std = mean, std

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        sample = self.samples[index]
        image = load_image(sample.image, self.mean, self.std)
        label = load_train_ids(sample.label) if sample.label is not None else torch.empty(0, dtype=torch.long)
        if sample.label is not None:
            _same_size(label, tuple(image.shape[1:]), sample.label)
        if tuple(image.shape[1:]) != (self.test_h, self.test_w):
            image, _ = _resize(image, None, (self.test_h, self.test_w))
        return image, label
