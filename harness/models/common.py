"""Building blocks several families share, as United-Perception writes them (up/tasks/seg/models/components.py)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class ConvBNReLU(nn.Sequential):
    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 3, stride: int = 1, dilation: int = 1,
                 relu: bool = True):
        padding = dilation * (kernel_size - 1) // 2
        layers: list[nn.Module] = [
            nn.Conv2d(in_ch, out_ch, kernel_size, stride, padding, dilation=dilation, bias=False),
            nn.BatchNorm2d(out_ch),
        ]
        if relu:
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


def upsample(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """UP's resize everywhere: bilinear with align_corners=True (a no-op at the same size)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)


class PyramidPooling(nn.Module):
    """UP's `PSPModule` (PSPNet, ICNet, DF-Seg, SFNet), layer for layer.

    Per bin: adaptive average pool, 1x1 conv (no bias), BN, no ReLU; upsampled with align_corners=True.
    The pooled maps, then the input, are concatenated and merged by a 1x1 conv (no bias) WITH PADDING 1,
    BN, ReLU, dropout 0.1. The padding is UP's: the output is 2 pixels taller and wider than the input
    (its border is the BN-ReLU of zeros); the decoders resize it to the next tap anyway.
    """

    def __init__(self, in_ch: int, out_ch: int, bins: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1):
        super().__init__()
        self.pools = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(b), nn.Conv2d(in_ch, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch))
            for b in bins
        )
        self.merge = nn.Sequential(
            nn.Conv2d(in_ch + len(bins) * out_ch, out_ch, 1, padding=1, bias=False),
            nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True), nn.Dropout2d(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        return self.merge(torch.cat([*(upsample(pool(x), size) for pool in self.pools), x], dim=1))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class GroupedBatchNorm2d(nn.BatchNorm2d):
    """Batch norm over groups of `group_images` images, as United-Perception's `solo_bn` normalised each GPU's own
    batch (SFNet's head): UP trained on 8 GPUs, so a head batch norm saw one GPU's 2 images, never the global batch.

    The groups are strided, as the loss's (harness.engine.losses): of N images in k = N // group_images groups,
    group g holds images g, g + k, g + 2k, ... Processes get a global batch dealt round-robin, so these are the same
    groups of the same images on any number of processes, and the layer needs no communication (it stays per
    process, never SyncBatchNorm). The running statistics follow group 0 alone: what UP's rank 0 kept (its
    checkpoints, and so its EMA and its best.pt, were rank 0's), one per-GPU batch per step. Group 0 of the global
    batch is the first group of rank 0, so in a distributed run rank 0's buffers are the ones to keep
    (harness.engine.train broadcasts them after every step).

    `group_images` 0 (the default, and eval mode) behaves as nn.BatchNorm2d; parameters and buffers are
    nn.BatchNorm2d's, so state dicts and parameter counts are unchanged.
    """

    group_images: int = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        groups = n // self.group_images if self.group_images else 1
        if not self.training or groups <= 1 or not self.track_running_stats or self.running_mean is None:
            return super().forward(x)
        factor = self.momentum
        if self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average, as nn.BatchNorm2d
                factor = 1.0 / float(self.num_batches_tracked)
        factor = 0.0 if factor is None else factor
        assert self.running_var is not None
        mean, var = self.running_mean.repeat(groups), self.running_var.repeat(groups)
        weight = self.weight.repeat(groups) if self.weight is not None else None
        bias = self.bias.repeat(groups) if self.bias is not None else None
        if n % groups == 0:
            # (N, C, H, W) -> (N/k, k*C, H, W): image j*k + g lands in channels g*C..g*C+C-1, so batch norm over the
            # new channels is one batch norm per group, in one kernel.
            per_group = x.reshape(n // groups, groups * x.shape[1], *x.shape[2:])
            out = F.batch_norm(per_group, mean, var, weight, bias, True, factor, self.eps).reshape(x.shape)
        else:  # groups of unequal size: one batch norm each
            channels = x.shape[1]
            own_weight = None if weight is None else weight[:channels]
            own_bias = None if bias is None else bias[:channels]
            parts = [F.batch_norm(x[g::groups], mean[g * channels:(g + 1) * channels],
                                  var[g * channels:(g + 1) * channels], own_weight, own_bias, True, factor, self.eps)
                     for g in range(groups)]
            out = parts[0].new_empty(x.shape)
            for g, part in enumerate(parts):
                out[g::groups] = part
        if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
            out = out.contiguous(memory_format=torch.channels_last)  # the next conv's layout, as the input's
        with torch.no_grad():
            self.running_mean.copy_(mean[: self.num_features])
            self.running_var.copy_(var[: self.num_features])
        return out


def group_batch_norms(module: nn.Module) -> nn.Module:
    """`module` with every nn.BatchNorm2d inside it replaced by a GroupedBatchNorm2d holding the same tensors."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            grouped = GroupedBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                         child.track_running_stats)
            grouped.load_state_dict(child.state_dict())
            setattr(module, name, grouped)
        else:
            group_batch_norms(child)
    return module


def set_norm_groups(model: nn.Module, group_images: int) -> int:
    """Make every GroupedBatchNorm2d of `model` normalise over groups of `group_images` images (UP's per-GPU
    batch); returns how many layers there are."""
    layers = [m for m in model.modules() if isinstance(m, GroupedBatchNorm2d)]
    for layer in layers:
        layer.group_images = group_images
    return len(layers)
