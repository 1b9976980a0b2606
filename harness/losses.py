"""Segmentation losses: cross entropy or OHEM cross entropy, summed over the main and auxiliary outputs."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from harness.errors import BenchError
from harness.spec import LossSpec


def ohem_keep_mask(logits: torch.Tensor, target: torch.Tensor, thresh: float, min_kept: int,
                   ignore_index: int = 255) -> torch.Tensor:
    """Pixels OHEM trains on (lxtGH `OhemCrossEntropy2dTensor`).

    Among valid pixels, keep those whose true-class probability is at most max(thresh, p_k), where
    p_k is the min_kept-th smallest such probability: the hard pixels, and never fewer than min_kept.
    """
    valid = target != ignore_index
    num_valid = int(valid.sum())
    if num_valid == 0 or min_kept >= num_valid:
        return valid
    with torch.no_grad():
        prob = logits.softmax(dim=1).gather(1, target.clamp(max=logits.shape[1] - 1).unsqueeze(1)).squeeze(1)
        valid_prob = prob[valid]
        threshold = thresh
        if min_kept > 0:
            kth = valid_prob.kthvalue(min_kept).values.item()
            threshold = max(thresh, kth)
        return valid & (prob <= threshold)


def global_pixel_mean(loss_sum: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Mean over the valid pixels of the global batch, however many processes share it.

    DDP averages gradients over ranks, so each rank divides by (global count / world size): the
    gradient is then that of one process holding the whole batch, and the recipe does not change
    with the GPU count.
    """
    if dist.is_initialized() and dist.get_world_size() > 1:
        total = count.detach().float().clone()
        dist.all_reduce(total)
        return loss_sum * dist.get_world_size() / total.clamp(min=1)
    return loss_sum / count.clamp(min=1)


class SegmentationLoss(nn.Module):
    """Main output weight 1, auxiliary outputs weighted as the spec says; logits upsampled to the label size."""

    def __init__(self, spec: LossSpec, ignore_index: int = 255, min_kept: int | None = None):
        super().__init__()
        if spec.name not in ("ce", "ohem"):
            raise BenchError(f"loss.name: unknown loss '{spec.name}'; use 'ce' or 'ohem'")
        self.spec = spec
        self.ignore_index = ignore_index
        self.min_kept = spec.ohem_min_kept if min_kept is None else min_kept

    def single(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.shape[-2:] != target.shape[-2:]:
            logits = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)
        if self.spec.name == "ohem":
            keep = ohem_keep_mask(logits, target, self.spec.ohem_thresh, self.min_kept, self.ignore_index)
            target = torch.where(keep, target, torch.full_like(target, self.ignore_index))
        total = F.cross_entropy(logits.float(), target, ignore_index=self.ignore_index, reduction="sum")
        return global_pixel_mean(total, (target != self.ignore_index).sum())

    def forward(self, outputs: torch.Tensor | Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        if isinstance(outputs, torch.Tensor):
            outputs = (outputs,)
        main, *aux = outputs
        if len(aux) != len(self.spec.aux_weights):
            raise BenchError(
                f"loss.aux_weights: the model returns {len(aux)} auxiliary outputs but the spec gives "
                f"{len(self.spec.aux_weights)} weights; list one weight per auxiliary head"
            )
        loss = self.single(main, target)
        for weight, logits in zip(self.spec.aux_weights, aux):
            loss = loss + weight * self.single(logits, target)
        return loss
