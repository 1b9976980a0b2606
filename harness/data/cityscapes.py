"""Cityscapes in its official layout (its labelId -> trainId mapping: harness.data.labels).

    <root>/leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    <root>/gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png
"""

from __future__ import annotations

import io
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Protocol

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from harness.data.augment import draw_augmentation
from harness.data.frame_slots import Frame, FrameSlots
from harness.data.labels import label_ids_to_train_ids
from harness.data.png import PngHeader, decode_png, plain_header
from harness.data.roots import check_root
from harness.errors import BenchError

NUM_CLASSES = 19

CLASS_NAMES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
)
PALETTE = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
    (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
)

# ImageNet statistics on 0-255 RGB (UP's `normalize`); specs carry them as data.mean / data.std.
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)

IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelIds.png"


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


DIGEST_CHARS = 32  # of the SHA-256 hex digest: MLflow keeps a dataset digest in 36 characters


def split_digest(root: Path, samples: Sequence[Sample]) -> str:
    """A split's identity: SHA-256 over its files (image and label, each as its path under `root` and its size in
    bytes), sorted. Two copies differ here when a file is missing, renamed or of another size (truncated,
    re-encoded); the contents are not read (hashing 5,000 PNGs would take minutes)."""
    import hashlib

    lines = []
    for sample in samples:
        for path in (sample.image, sample.label):
            if path is not None:
                lines.append(f"{path.relative_to(root).as_posix()}\t{path.stat().st_size}")
    return hashlib.sha256("\n".join(sorted(lines)).encode()).hexdigest()[:DIGEST_CHARS]


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
        found = label.is_file()
        if not found and require_labels:
            raise BenchError(f"missing ground truth {label} for image {image}; "
                             "expected gtFine beside leftImg8bit")
        samples.append(Sample(image, label if found else None))
    return samples


# Cityscapes frames are 2048x1024; anything beyond this is a wrong file, and decoding it could exhaust memory
# (PIL's decompression-bomb guard would raise a traceback at twice its own 89-Mpixel limit).
MAX_PIXELS = 64_000_000
# Label PNGs hold one labelId per pixel: 8-bit grey ("L"), or a palette ("P") whose indices are the ids.
LABEL_MODES = ("L", "P")


def read_header(path: Path, data: Optional[bytes] = None) -> PngHeader:
    """Size and mode from the file's header (from `data`, its bytes, where they were read already), without
    decoding its pixels."""
    try:
        with Image.open(path if data is None else io.BytesIO(data)) as img:
            return PngHeader(img.width, img.height, img.mode)
    except Image.DecompressionBombError:
        raise BenchError(f"image {path} is too large to be a Cityscapes frame (beyond PIL's decompression limit); "
                         "replace or remove it") from None
    except (OSError, ValueError) as exc:
        raise BenchError(f"cannot read image {path} ({exc}); replace or remove it") from None


def check_image_header(path: Path, header: PngHeader) -> None:
    if header.width < 1 or header.height < 1 or header.width * header.height > MAX_PIXELS:
        raise BenchError(f"image {path} is {header.width}x{header.height}, not a sane Cityscapes frame size "
                         f"(at most {MAX_PIXELS // 1_000_000} Mpixel; Cityscapes frames are 2048x1024); "
                         "replace or remove it")


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
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BenchError(f"cannot read image {path}: {exc}") from None
    # The header comes from the bytes just read: the IHDR of a plain PNG, else Pillow's reading of them.
    plain = plain_header(data)
    header = plain or read_header(path, data)
    check_image_header(path, header)
    if mode == "L" and header.mode not in LABEL_MODES:
        raise BenchError(f"label {path} is a {header.mode} image, not an 8-bit single-channel labelIds PNG; "
                         f"use the *{LABEL_SUFFIX} files")
    try:
        if plain is not None and plain.mode == mode:  # 8-bit RGB or grey as stored: the fastest decoder installed
            return decode_png(data)
        with Image.open(io.BytesIO(data)) as img:
            if mode == "L" and img.mode in LABEL_MODES:
                return np.array(img)  # a palette label's indices are its labelIds: never map them to grey levels
            return np.array(img.convert(mode))
    except (OSError, ValueError, RuntimeError) as exc:  # RuntimeError: libspng's errors
        raise BenchError(f"cannot read image {path}: {exc}") from None


def _same_size(label_hw: Sequence[int], image_hw: Sequence[int], path: Path) -> None:
    if tuple(label_hw) != tuple(image_hw):
        raise BenchError(f"label {path} is {label_hw[1]}x{label_hw[0]} but its image is "
                         f"{image_hw[1]}x{image_hw[0]}; each labelIds PNG must have its image's size")


def decode_image(path: Path) -> torch.Tensor:
    """The image file as a uint8 HxWx3 RGB tensor (no conversion beyond RGB: normalising is the device's job)."""
    return torch.from_numpy(_read_png(path, "RGB"))


def decode_train_ids(path: Path) -> torch.Tensor:
    """A labelIds file as a uint8 HxW tensor of trainIds (255: ignored)."""
    return torch.from_numpy(label_ids_to_train_ids(_read_png(path, "L")))


def load_train_ids(path: Path) -> torch.Tensor:
    """A labelIds file as int64 HxW trainIds (for scoring saved predictions and drawing panels)."""
    return decode_train_ids(path).long()


def decode_pair_arrays(sample: Sample) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 HxWx3 image, uint8 HxW labelIds as stored) as arrays; an empty label for a sample without ground truth.
    The training device maps the labelIds to trainIds (harness.data.labels.train_ids_of)."""
    image = _read_png(sample.image, "RGB")
    if sample.label is None:
        return image, np.empty(0, dtype=np.uint8)
    label = _read_png(sample.label, "L")
    _same_size(label.shape, image.shape[:2], sample.label)
    return image, label


def decode_pair(sample: Sample) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 HxWx3 image, uint8 HxW labelIds); an empty label for a sample without ground truth."""
    image, label = decode_pair_arrays(sample)
    return torch.from_numpy(image), torch.from_numpy(label)


def _pair_arrays(sample: Sample, decoded: Optional[DecodedSource], index: int) -> tuple[np.ndarray, np.ndarray]:
    if decoded is not None:
        image, label = decoded[index]
        return image.numpy(), label.numpy()
    return decode_pair_arrays(sample)


def _handed_over(slots: Optional[FrameSlots], image: np.ndarray, label: np.ndarray) -> tuple[Frame, Frame]:
    """How a worker returns a decoded pair: in a shared slot where one is free, else as tensors."""
    in_slots = slots.put(image, label) if slots is not None else None
    return in_slots if in_slots is not None else (torch.from_numpy(image), torch.from_numpy(label))


def frame_bytes(samples: Sequence[Sample]) -> int:
    """The bytes of the first sample's image and label, as a worker hands them over (0 without samples)."""
    if not samples:
        return 0
    header = read_header(samples[0].image)
    return header.width * header.height * 4


class DecodedSource(Protocol):
    """Frames decoded beforehand (harness.data.decoded.DecodedFrames): the image and labelIds of a sample index."""

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]: ...


class CityscapesTrain(Dataset):
    """Training samples decoded in the loader workers, each with its augmentation draw (harness.data.augment):
    UP's random scale of the full image, horizontal flip and crop, drawn from the sample's key alone. The
    augmentation itself runs on the training device (augment.TrainTransform)."""

    def __init__(self, samples: list[Sample], crop_size: Sequence[int], scale_range: Sequence[float],
                 flip: bool = True, decoded: Optional[DecodedSource] = None):
        self.samples = samples
        self.crop_size, self.scale_range, self.flip = list(crop_size), list(scale_range), flip
        self.decoded = decoded
        self.slots: Optional[FrameSlots] = None  # set by the loader that starts workers (loaders.train_loader)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Frame, Frame, torch.Tensor]:
        # A (index, seed) key makes the augmentation a function of the key alone: the same on any
        # number of processes or workers, and after a resume (see distributed.ShardedTrainSampler).
        index, seed = key if isinstance(key, tuple) else (key, None)
        rng = random.Random(seed) if seed is not None else random
        image, label = _pair_arrays(self.samples[index], self.decoded, index)
        draw = draw_augmentation(rng, tuple(label.shape), self.crop_size, self.scale_range, self.flip)
        return *_handed_over(self.slots, image, label), draw.as_tensor()


class CityscapesEval(Dataset):
    """Whole images and their full-resolution labelIds, decoded, with the sample's position in the split; the
    resize to the test size and the normalisation run on the device (augment.EvalTransform), the labels are mapped
    to trainIds there, and predictions are scored at the ground truth's size, as the official evaluator scores."""

    def __init__(self, samples: list[Sample], decoded: Optional[DecodedSource] = None):
        self.samples = samples
        self.decoded = decoded
        self.slots: Optional[FrameSlots] = None  # set by the loader that starts workers (loaders.eval_loader)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Frame, Frame, int]:
        return *_handed_over(self.slots, *_pair_arrays(self.samples[index], self.decoded, index)), index
