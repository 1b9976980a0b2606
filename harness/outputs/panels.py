"""Image / ground truth / prediction panels in the Cityscapes colour palette, as PNG files.

A panel puts the three side by side at one tile width, each under a caption; ignored ground truth
is black. The files are plain PNGs for the caller to log (e.g. as MLflow artifacts).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image, ImageDraw

from harness.config.plan import TrainPlan, size_pair
from harness.data.augment import EvalTransform
from harness.data.cityscapes import NUM_CLASSES, PALETTE, Sample
from harness.data.loaders import eval_loader
from harness.engine.evaluate import Scored, TestMode, evaluate
from harness.errors import BenchError

IGNORE_COLOUR = (0, 0, 0)
CAPTION_HEIGHT = 16
GAP = 4

_LUT = np.zeros((256, 3), dtype=np.uint8)
_LUT[:] = IGNORE_COLOUR
_LUT[:NUM_CLASSES] = np.asarray(PALETTE, dtype=np.uint8)


def colorize(train_ids: np.ndarray | torch.Tensor) -> np.ndarray:
    """HxW trainIds -> HxWx3 uint8 in the Cityscapes palette; 255 (ignored) and unknown ids are black."""
    if isinstance(train_ids, torch.Tensor):
        train_ids = train_ids.detach().cpu().numpy()
    train_ids = np.asarray(train_ids)
    return _LUT[np.clip(train_ids, 0, 255).astype(np.uint8)]


def _read_rgb(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))
    except (OSError, ValueError) as exc:
        raise BenchError(f"cannot read image {path}: {exc}") from None


def _tile(array: np.ndarray, width: int, height: int, resample: Image.Resampling) -> Image.Image:
    img = Image.fromarray(array)
    return img if img.size == (width, height) else img.resize((width, height), resample)


def make_panel(image: np.ndarray | Path, prediction: np.ndarray | torch.Tensor,
               ground_truth: Optional[np.ndarray | torch.Tensor] = None, tile_width: int = 1024) -> Image.Image:
    """One panel: image | ground truth | prediction (ground truth left out when None), each `tile_width` wide.

    `image` is an HxWx3 uint8 array or an image file; `prediction` and `ground_truth` are trainId maps.
    Label maps are resized with nearest neighbour so no colour outside the palette appears.
    """
    rgb = _read_rgb(Path(image)) if isinstance(image, (str, Path)) else np.asarray(image, dtype=np.uint8)
    prediction = colorize(prediction)
    label_maps = [("ground truth", colorize(ground_truth))] if ground_truth is not None else []
    label_maps.append(("prediction", prediction))
    ref_h, ref_w = prediction.shape[:2]
    tile_w = min(tile_width, ref_w)
    tile_h = max(1, round(ref_h * tile_w / ref_w))
    tiles = [("image", _tile(rgb, tile_w, tile_h, Image.Resampling.BILINEAR))]
    tiles += [(name, _tile(m, tile_w, tile_h, Image.Resampling.NEAREST)) for name, m in label_maps]
    panel = Image.new("RGB", (len(tiles) * tile_w + (len(tiles) - 1) * GAP, tile_h + CAPTION_HEIGHT), (255, 255, 255))
    draw = ImageDraw.Draw(panel)
    for i, (caption, tile) in enumerate(tiles):
        left = i * (tile_w + GAP)
        panel.paste(tile, (left, CAPTION_HEIGHT))
        draw.text((left + 2, 2), caption, fill=(0, 0, 0))
    return panel


def panel_path(out_dir: Path, sample: Sample) -> Path:
    return Path(out_dir) / f"{sample.stem}_panel.png"


def save_panel(image: np.ndarray | Path, prediction: np.ndarray | torch.Tensor,
               ground_truth: Optional[np.ndarray | torch.Tensor], path: Path, tile_width: int = 1024) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    make_panel(image, prediction, ground_truth, tile_width).save(path)
    return path


def panel_indices(total: int, count: int) -> list[int]:
    """`count` indices spread evenly over `total` images (first and last included), so panels span cities."""
    if total <= 0 or count <= 0:
        return []
    if count >= total:
        return list(range(total))
    if count == 1:
        return [0]
    return sorted({round(i * (total - 1) / (count - 1)) for i in range(count)})


class PanelWriter:
    """A sink of the evaluation loop: image / ground truth / prediction panels of the images at `indices`."""

    def __init__(self, out_dir: Path, indices: Sequence[int]):
        self.out_dir, self.indices = Path(out_dir), set(indices)
        self.written: list[Path] = []

    def __call__(self, scored: Scored) -> None:
        if scored.index in self.indices:
            truth = scored.label.cpu().numpy() if scored.label.numel() else None
            self.written.append(save_panel(scored.image.numpy(), scored.prediction.cpu().numpy().astype(np.uint8),
                                           truth, panel_path(self.out_dir, scored.sample)))


def prediction_panels(model: torch.nn.Module, samples: Sequence[Sample], plan: TrainPlan, device: torch.device,
                      out_dir: Path, count: int = 4) -> list[Path]:
    """Image / ground truth / prediction panels of `count` labelled samples spread over the split, predicted in the
    plan's test mode, for a training run's MLflow images."""
    chosen = [samples[i] for i in panel_indices(len(samples), count) if samples[i].label is not None]
    if not chosen:
        return []
    writer = PanelWriter(out_dir, range(len(chosen)))
    evaluate({"model": model}, eval_loader(chosen, device, 0), device,
             EvalTransform(size_pair(plan.test_size), tuple(plan.mean), tuple(plan.std)), mode=TestMode.from_plan(plan),
             precision=plan.precision, sinks=[writer], score=False, progress=False, desc="panels")
    return writer.written
