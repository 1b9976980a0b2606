"""Result records shaped like those `bench run` writes (harness.report.finish.training_record), for table and verdict tests."""

from __future__ import annotations

import math
from typing import Any

from harness.config.spec import load_spec
from harness.report.records import SCHEMA_VERSION


def full_budget_record(row: str, miou: float, **change: Any) -> dict[str, Any]:
    """A full-budget Cityscapes training record of `row` measuring `miou` (the table's statistic), with `change`."""
    spec = load_spec(row)
    ema = spec.columns.ema
    record = {
        "kind": "train", "schema": SCHEMA_VERSION, "row": row, "dataset": "cityscapes", "seed": 0,
        "miou": miou - 0.3, "miou_best": miou if not ema else miou - 0.2, "best_iteration": 1000,
        "miou_ema": miou - 0.1 if ema else None, "miou_ema_best": miou if ema else None,
        "best_iteration_ema": 1000 if ema else None, "pixel_accuracy": 95.0,
        "starting_weights": f"loaded weights/{row}.pth", "per_class_iou": {}, "per_class_iou_ema": None,
        "iterations": spec.columns.epochs * math.ceil(2975 / spec.columns.batch_size),  # UP's epochs, last batch padded
        "batch_size": spec.columns.batch_size,
        "crop_size": spec.train.crop_size, "train_images": 2975, "val_images": 500,
        "devices": 8, "device": "cuda", "precision": "bf16", "checkpoint": "runs/x/ckpt.pt",
        "wall_time_s": 36000.0, "git_commit": "abc", "versions": {}, "tracking_run_id": None,
        "time": "2026-01-01T00:00:00Z", "_path": f"results/cityscapes/{row}/20260101T000000Z-norun.json",
    }
    record.update(change)
    return record


def line_of(markdown: str, row: str) -> dict[str, str]:
    """The first table line of `row` in `markdown` as {column: cell}, named by its own table's header."""
    lines = markdown.splitlines()
    header = None
    for i, line in enumerate(lines):
        if i + 1 < len(lines) and lines[i + 1].startswith("|--"):
            header = [c.strip() for c in line.strip("|").split("|")]
        elif line.startswith(f"| {row} ") and header:
            cells = [c.strip().replace("\x00", "\\|") for c in line.replace("\\|", "\x00").strip("|").split("|")]
            return dict(zip(header, cells))
    raise AssertionError(f"no table line for {row}")
