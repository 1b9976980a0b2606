"""Figures (matplotlib's Agg canvas: no display on clusters and in CI): per-class IoU bars and the training curves
logged with each run, and the per-class heatmap of `bench compare`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from harness.config.curves import TRAIN_LOSS, TRAIN_LR, VAL_MIOU_EMA, VAL_MIOU_RAW, VAL_MIOU_UNNAMED
from harness.data.cityscapes import PALETTE


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on clusters and in CI
    import matplotlib.pyplot as plt

    return plt


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
    # the unnamed curve: the raw weights' in runs before the curves named their weights (an old run's report)
    panels = [("loss", [TRAIN_LOSS]), ("learning rate", [TRAIN_LR]),
              ("val mIoU", [VAL_MIOU_RAW, VAL_MIOU_UNNAMED, VAL_MIOU_EMA])]
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


def per_class_heatmap(labels: list[str], classes: list[str], values: list[list[Optional[float]]], path: Path,
                      title: str = "per-class IoU") -> Path:
    """Runs (rows) x classes (columns), each cell its IoU in % on one fixed 0-100 colour scale and written in;
    an undefined IoU is a grey cell marked "-". The same values give the same bytes."""
    import numpy as np

    plt = _pyplot()
    grid = np.array([[np.nan if v is None else v for v in row] for row in values], dtype=float)
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * len(classes), 1.2 + 0.45 * len(labels)), dpi=100)
    cmap = plt.get_cmap("viridis").with_extremes(bad="#cccccc")
    image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=0, vmax=100, aspect="auto")
    for r in range(grid.shape[0]):
        for c in range(grid.shape[1]):
            value = grid[r, c]
            text = "-" if np.isnan(value) else f"{value:.1f}"
            ax.text(c, r, text, ha="center", va="center", fontsize=7,
                    color="black" if np.isnan(value) or value > 60 else "white")
    ax.set_xticks(range(len(classes)), classes, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, fraction=0.025, pad=0.01, label="IoU (%)")
    fig.tight_layout()
    return _save(plt, fig, path)
