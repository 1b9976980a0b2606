"""Image / ground truth / prediction panels in the Cityscapes colour palette, as PNG files.

A panel puts the three side by side at one tile width, each under a caption; ignored ground truth
is black. The files are plain PNGs for the caller to log (e.g. as MLflow artifacts).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from harness import export
from harness.data.cityscapes import NUM_CLASSES, PALETTE, Sample, load_train_ids
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


def save_panels(samples: Sequence[Sample], predictions_dir: Path, out_dir: Path,
                tile_width: int = 1024) -> list[Path]:
    """Panels for `samples` from prediction PNGs already written under `predictions_dir` (harness.export)."""
    paths = []
    for sample in samples:
        rgb = _read_rgb(sample.image)
        ground_truth = load_train_ids(sample.label).numpy() if sample.label is not None else None
        size = (rgb.shape[1], rgb.shape[0]) if ground_truth is None else (ground_truth.shape[1], ground_truth.shape[0])
        prediction = export.read_prediction_train_ids(export.prediction_path(predictions_dir, sample), size)
        paths.append(save_panel(rgb, prediction, ground_truth, panel_path(out_dir, sample), tile_width))
    return paths


# --- figures logged with each MLflow run (matplotlib, no display needed) ----------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on clusters and in CI
    import matplotlib.pyplot as plt

    return plt


def prediction_panels(model: torch.nn.Module, samples: Sequence[Sample], spec, device: torch.device,
                      test_size: Sequence[int], precision: str, out_dir: Path, count: int = 4) -> list[Path]:
    """Image / ground truth / prediction panels of `count` labelled samples spread over the split, predicted
    in the row's test mode (harness.evaluate), for a training run's MLflow images."""
    from harness.evaluate import evaluate_split, panel_indices

    chosen = [samples[i] for i in panel_indices(len(samples), count) if samples[i].label is not None]
    if not chosen:
        return []
    evaluate_split(model, chosen, spec, device, test_size=test_size, precision=precision, panels_dir=out_dir,
                   num_panels=len(chosen), workers=0, progress=False, desc="panels")
    return [panel_path(out_dir, s) for s in chosen]


def per_class_chart(per_class: dict[str, dict[str, float]], path: Path, title: str = "per-class IoU") -> Path:
    """Horizontal bars of IoU per class in the Cityscapes class order, one bar per weight set
    (`{"val_iou": {...}, "val_iou_ema": {...}}`), each class in its palette colour."""
    plt = _pyplot()
    groups = list(per_class.items())
    names = list(groups[0][1])
    fig, ax = plt.subplots(figsize=(7, 0.32 * len(names) * len(groups) + 1.2), dpi=100)
    height = 0.8 / len(groups)
    for g, (group, values) in enumerate(groups):
        positions = [i + g * height for i in range(len(names))]
        colours = [tuple(c / 255 for c in PALETTE[i]) for i in range(len(names))]
        ax.barh(positions, [values[n] for n in names], height=height, color=colours,
                alpha=1.0 if g == 0 else 0.55, edgecolor="black", linewidth=0.4, label=group)
        for y, name in zip(positions, names):
            ax.text(values[name] + 0.5, y, f"{values[name]:.1f}", va="center", fontsize=7)
    ax.set_yticks([i + height * (len(groups) - 1) / 2 for i in range(len(names))], names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 105)
    ax.set_xlabel("IoU (%)")
    ax.set_title(title, fontsize=10)
    if len(groups) > 1:
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return _save(plt, fig, path)


def training_curves(history: dict[str, list[tuple[int, float]]], path: Path, title: str = "training") -> Path:
    """Loss, learning rate and validation mIoU (raw and EMA) against the iteration, one panel each."""
    plt = _pyplot()
    panels = [("loss", ["train/loss"]), ("learning rate", ["train/lr"]), ("val mIoU", ["val/miou", "val/miou_ema"])]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2), dpi=100)
    for ax, (label, keys) in zip(axes, panels):
        for key in keys:
            points = sorted(dict(history.get(key, [])).items())  # a resumed step logged twice counts once
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, marker="o" if len(points) < 20 else None, markersize=3, label=key)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        if len(keys) > 1 and ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(plt, fig, path)


def _save(plt, fig, path: Path) -> Path:
    """Write the figure as PNG without a Software stamp (the bytes depend only on the data) and free it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)
    return path
