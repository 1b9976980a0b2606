"""Segmentation losses: cross entropy or OHEM cross entropy, summed over the main and auxiliary outputs."""

from __future__ import annotations

from typing import Sequence

import torch
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
        # `not above` rather than `at most`: a NaN probability (a diverged network) stays in the loss, so the
        # divergence check sees it instead of OHEM silently dropping every pixel.
        return valid & ~(prob > threshold)


class SegmentationLoss(nn.Module):
    """Main output weight 1, auxiliary outputs weighted as the spec says; logits upsampled to the label size.

    UP computed its loss on each GPU's images (OHEM's min_kept counts the pixels of one GPU's batch) and
    DDP averaged the GPUs' means. `group_images` reproduces that whatever the process count: the batch is
    cut into groups of that many images (UP's per-GPU batch), each group's loss is the mean over its kept
    pixels, and the loss is the mean over groups; DDP's average over processes then equals the mean over
    all groups of the global batch. 0 makes the whole batch one group.
    """

    def __init__(self, spec: LossSpec, ignore_index: int = 255, min_kept: int | None = None, group_images: int = 0):
        super().__init__()
        if spec.name not in ("ce", "ohem"):
            raise BenchError(f"loss.name: unknown loss '{spec.name}'; use 'ce' or 'ohem'")
        self.spec = spec
        self.ignore_index = ignore_index
        self.min_kept = spec.ohem_min_kept if min_kept is None else min_kept
        self.group_images = group_images

    def single(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.shape[-2:] != target.shape[-2:]:
            logits = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)
        groups = max(1, logits.shape[0] // self.group_images) if self.group_images else 1
        means = []
        # Strided groups (images k, k + groups, ...): the sampler deals a global batch round-robin to the
        # processes, so these are the same groups of the same images on any number of processes.
        for k in range(groups):
            group_logits, group_target = logits[k::groups], target[k::groups]
            if self.spec.name == "ohem":
                keep = ohem_keep_mask(group_logits, group_target, self.spec.ohem_thresh, self.min_kept, self.ignore_index)
                group_target = torch.where(keep, group_target, torch.full_like(group_target, self.ignore_index))
            total = F.cross_entropy(group_logits.float(), group_target, ignore_index=self.ignore_index, reduction="sum")
            means.append(total / (group_target != self.ignore_index).sum().clamp(min=1))
        return torch.stack(means).mean()
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
