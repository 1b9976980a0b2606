"""Result records shaped like those `bench run` writes (harness.report.finish.training_record), built through their
dataclass (harness.report.records.TrainRecord), for table and verdict tests."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from harness.config.plan import make_plan
from harness.config.spec import load_spec
from harness.report.records import TrainRecord


def full_budget_record(row: str, miou: float, **change: Any) -> TrainRecord:
    """A full-budget Cityscapes training record of `row` measuring `miou` (the table's statistic), with `change`."""
    spec = load_spec(row)
    ema = spec.columns.ema
    record = TrainRecord(
        row=row, dataset="cityscapes", seed=0, miou=miou, miou_weights="ema" if ema else "raw", miou_iteration=1000,
        miou_final=miou - 0.3, pixel_accuracy=95.0, miou_ema=miou - 0.1 if ema else None,
        miou_best=miou if not ema else miou - 0.2, best_iteration=1000,
        miou_ema_best=miou if ema else None, best_iteration_ema=1000 if ema else None,
        best_checkpoint="runs/x/best.pt", starting_weights=f"loaded weights/{row}.pth",
        per_class_iou={}, per_class_iou_ema=None,
        iterations=spec.columns.epochs * math.ceil(2975 / spec.columns.batch_size),  # UP's epochs, last batch padded
        batch_size=spec.columns.batch_size, crop_size=list(spec.train.crop_size), train_images=2975, val_images=500,
        devices=8, device="cuda", precision="bf16", checkpoint="runs/x/ckpt.pt", wall_time_s=36000.0,
        git_commit="abc", behind=None, data_digests={"train": "t" * 32, "val": "v" * 32}, versions={},
        environment={"device_type": "cuda", "gpu": "NVIDIA A100-SXM4-80GB", "gpu_count": 8, "driver": "550.54",
                     "cuda_build": "12.4", "cudnn": 90100, "cpu": "AMD EPYC 7763", "cpu_count": 128, "os": "Linux"},
        plan=dataclasses.asdict(make_plan(spec, "cityscapes", 2975)), time="2026-01-01T00:00:00Z",
        tracking_run_id=None, weight_files=[], path=f"results/cityscapes/{row}/20260101T000000Z-norun.json",
    )
    return dataclasses.replace(record, **change)


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
