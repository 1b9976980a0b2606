"""Confusion-matrix segmentation metrics, scored the way the official Cityscapes evaluator scores."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from harness.errors import BenchError


class ConfusionMatrix:
    """Accumulates ground truth x prediction counts on the logits' device; ignored pixels never count."""

    def __init__(self, num_classes: int, ignore_index: int = 255, device: torch.device | str = "cpu"):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def update(self, prediction: torch.Tensor, target: torch.Tensor) -> None:
        # Ignored pixels are counted in one cell past the matrix and dropped: no boolean indexing, whose
        # data-dependent size would make the host wait for the device on every image.
        cells = self.num_classes**2
        target = target.long()
        index = target * self.num_classes + prediction.long().to(target.device)
        index = torch.where(target != self.ignore_index, index, torch.full_like(index, cells))
        counts = torch.bincount(index.reshape(-1), minlength=cells + 1)[:cells]
        self.matrix += counts.reshape(self.num_classes, self.num_classes).to(self.matrix.device)

    def compute(self) -> SegMetrics:
        return SegMetrics.from_matrix(self.matrix)


@dataclass
class SegMetrics:
    """Percentages. A class absent from both ground truth and prediction has IoU NaN and is left out of mIoU;
    no valid pixel at all is an error, never a NaN mIoU."""

    miou: float
    iou: list[float]
    pixel_accuracy: float

    @classmethod
    def from_matrix(cls, matrix: torch.Tensor) -> SegMetrics:
        matrix = matrix.double().cpu()
        if not float(matrix.sum()):
            # Scoring nothing would give NaN, which must never reach a record or the table.
            raise BenchError("the evaluated labels hold no valid pixel (every labelId maps to ignore, 255), so mIoU "
                             "is undefined; check the split's gtFine/*_gtFine_labelIds.png files (bench data check)")
        true_positive = matrix.diag()
        union = matrix.sum(0) + matrix.sum(1) - true_positive
        iou = torch.where(union > 0, true_positive / union.clamp(min=1), torch.full_like(union, math.nan))
        present = ~iou.isnan()
        miou = float(iou[present].mean()) * 100 if present.any() else math.nan
        total = float(matrix.sum())
        accuracy = float(true_positive.sum()) / total * 100 if total else math.nan
        return cls(miou=miou, iou=[float(v) * 100 for v in iou], pixel_accuracy=accuracy)
