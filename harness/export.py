"""Prediction files in the form the official Cityscapes evaluator and test server take.

One single-channel PNG of labelIds (not trainIds) per image, at ground-truth size, named exactly
like its image and kept in a folder per city:

    <out>/<city>/<city>_<seq>_<frame>_leftImg8bit.png

The official evaluator finds a prediction by the pattern `<city>_<seq>_<frame>*.png` anywhere under
its results folder, and the test server takes a zip of one such file per test image, so this one
layout serves `--save-predictions`, the official evaluator and a submission alike.
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image

from harness.data.cityscapes import LABEL_TO_TRAIN, NUM_CLASSES, Sample, train_ids_to_label_ids
from harness.errors import BenchError


def prediction_path(out_dir: Path, sample: Sample) -> Path:
    """Where the prediction for `sample` lives under `out_dir`."""
    return Path(out_dir) / sample.city / sample.image.name


def save_prediction(train_ids: np.ndarray | torch.Tensor, path: Path) -> Path:
    """Write an HxW map of trainIds (0..18) as a labelId PNG at `path`; returns `path`."""
    if isinstance(train_ids, torch.Tensor):
        train_ids = train_ids.detach().cpu().numpy()
    train_ids = np.asarray(train_ids)
    if train_ids.ndim != 2:
        raise ValueError(f"a prediction is one HxW map of trainIds, got shape {train_ids.shape}")
    if train_ids.size and (train_ids.min() < 0 or train_ids.max() >= NUM_CLASSES):
        raise ValueError(f"trainIds must lie in 0..{NUM_CLASSES - 1}, got {train_ids.min()}..{train_ids.max()}")
    label_ids = train_ids_to_label_ids(train_ids.astype(np.uint8))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write beside the target, then rename: an interrupted run never leaves a truncated PNG that
    # a later zip or evaluation would pick up as a prediction.
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".png", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            Image.fromarray(label_ids).save(handle, format="PNG")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def read_prediction(path: Path, size: Optional[tuple[int, int]] = None) -> np.ndarray:
    """The labelIds of one prediction PNG as an HxW uint8 array; `size` is the expected (width, height)."""
    path = Path(path)
    if not path.is_file():
        raise BenchError(f"missing prediction {path}; write predictions with `bench eval --save-predictions DIR`")
    try:
        with Image.open(path) as img:
            img.load()
            mode, img_size = img.mode, img.size
            array = np.asarray(img)
    except (OSError, ValueError, SyntaxError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BenchError(f"corrupt prediction {path} ({reason}); delete it and write the predictions again") from None
    if mode != "L":
        raise BenchError(f"prediction {path} has image mode {mode}; expected one channel of 8-bit labelIds (mode L)")
    if size is not None and tuple(img_size) != tuple(size):
        raise BenchError(f"prediction {path} is {img_size[0]}x{img_size[1]}, but its ground truth is "
                         f"{size[0]}x{size[1]}; predictions must be at ground-truth size")
    return array


def read_prediction_train_ids(path: Path, size: Optional[tuple[int, int]] = None) -> np.ndarray:
    """A prediction PNG mapped back to trainIds; labelIds outside the 19 classes become 255."""
    return LABEL_TO_TRAIN[read_prediction(path, size)]


def check_prediction(path: Path) -> None:
    """Raise a one-line BenchError unless `path` is a readable single-channel PNG (CRCs checked)."""
    path = Path(path)
    if not path.is_file():
        raise BenchError(f"missing prediction {path}; write predictions with `bench predict --split test --out DIR`")
    try:
        with Image.open(path) as img:
            mode, fmt = img.mode, img.format
            img.verify()
    except (OSError, ValueError, SyntaxError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BenchError(f"corrupt prediction {path} ({reason}); delete it and write the predictions again") from None
    if fmt != "PNG" or mode != "L":
        raise BenchError(f"prediction {path} is a {fmt} image of mode {mode}; expected a single-channel PNG of labelIds")


def make_submission_zip(folder: Path, zip_path: Path, samples: Optional[Sequence[Sample]] = None) -> Path:
    """Pack the predictions under `folder` into the zip the Cityscapes test server takes.

    With `samples`, exactly their predictions go in (one per image; a missing one is an error, stray
    files are left out); without, every PNG under `folder`. Entries keep their `<city>/<name>` path.
    """
    folder, zip_path = Path(folder), Path(zip_path)
    if not folder.is_dir():
        raise BenchError(f"prediction folder {folder} does not exist; write predictions with `bench predict --out DIR`")
    if samples is not None:
        files = [prediction_path(folder, sample) for sample in samples]
    else:
        files = sorted(p for p in folder.rglob("*.png") if not p.name.startswith(".tmp-"))
    if not files:
        raise BenchError(f"no prediction PNGs under {folder}; write predictions with `bench predict --out DIR`")
    for path in files:
        check_prediction(path)
    # The server matches each image by `<city>_<seq>_<frame>*.png`; two files for one image are rejected.
    seen: dict[str, Path] = {}
    for path in files:
        key = "_".join(path.name.split("_")[:3])
        if key in seen:
            raise BenchError(f"two predictions for image {key} ({seen[key]} and {path}); keep one")
        seen[key] = path
    zip_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = zip_path.with_name(f".tmp-{zip_path.name}")
    # PNGs are already compressed: storing them is as small and much faster than deflating again.
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as archive:
        for path in files:
            archive.write(path, path.relative_to(folder).as_posix())
    os.replace(tmp, zip_path)
    return zip_path
