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
