"""Evaluation: whole-image inference, one image at a time, into a confusion matrix on the device."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from harness.metrics import ConfusionMatrix, SegMetrics


@torch.no_grad()
def predict_logits(model: nn.Module, image: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
    """Logits for a batch of images, resized to `out_size` (the ground truth's height and width)."""
    logits = model(image)
    if logits.shape[-2:] != out_size:
        logits = F.interpolate(logits, size=out_size, mode="bilinear", align_corners=False)
    return logits


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, num_classes: int = 19,
             desc: str = "eval", progress: bool = True) -> SegMetrics:
    was_training = model.training
    model.eval()
    matrix = ConfusionMatrix(num_classes, device=device)
    for image, label in tqdm(loader, desc=desc, disable=not progress, leave=False, dynamic_ncols=True):
        label = label.to(device, non_blocking=True)
        logits = predict_logits(model, image.to(device, non_blocking=True), tuple(label.shape[-2:]))
        matrix.update(logits.argmax(1), label)
    model.train(was_training)
    return matrix.compute()
