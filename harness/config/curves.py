"""The names of the metrics a run logs, defined once for the code that logs them (the training loop, evaluation,
the early warning), the tracker that files the loop's keys under their group, and the readers (the early warning,
the curves image, a journal's training progress, `bench sweep status`).

The training loop logs plain keys (`train_loss`, `lr`, `images_per_s`), which a tracker files under the `train`
group (`train/loss`, `train/lr`); the validation curves are logged by their full names, which say whose weights
they score."""

from __future__ import annotations

TRAIN = "train"  # the group of the training loop's curves
VAL = "val"  # the group of the validation curves


def grouped(group: str, key: str) -> str:
    """`train/loss`: a curve's name under its group, as trackers chart it."""
    return f"{group}/{key}"


TRAIN_LOSS = grouped(TRAIN, "loss")
TRAIN_LR = grouped(TRAIN, "lr")


def val_curve(metric: str, weights: str) -> str:
    """`val/miou_ema`: the validation `metric` (miou, pixel_accuracy) of the `weights` ("raw" or "ema") scored, in
    training and evaluation runs alike."""
    return grouped(VAL, f"{metric}_{weights}")


VAL_MIOU_RAW = val_curve("miou", "raw")
VAL_MIOU_EMA = val_curve("miou", "ema")
# The raw weights' curve in runs journalled before the curves named their weights: still read (early warning, plots).
VAL_MIOU_UNNAMED = grouped(VAL, "miou")

# The early warning's metric (and its field in run.json's `behind`): mIoU points behind earlier runs of the row.
BEHIND_MIOU = "behind_miou"


def per_class_group(weights: str) -> str:
    """`val_iou_ema`: the group of the per-class IoU of the `weights` ("raw" or "ema") scored (`val_iou_ema/road`)."""
    return "val_iou_ema" if weights == "ema" else "val_iou"
