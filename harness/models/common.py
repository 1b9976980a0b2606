"""Building blocks several families share: conv-BN-ReLU, the FCN auxiliary head, pyramid pooling."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import timm
import torch
import torch.nn.functional as F
from torch import nn


class ConvBNReLU(nn.Sequential):
    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 3, stride: int = 1, dilation: int = 1, relu: bool = True):
        padding = dilation * (kernel_size - 1) // 2
        layers: list[nn.Module] = [
            nn.Conv2d(in_ch, out_ch, kernel_size, stride, padding, dilation=dilation, bias=False),
            nn.BatchNorm2d(out_ch),
        ]
        if relu:
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class FCNHead(nn.Sequential):
    """The auxiliary head of mmsegmentation / torchvision: 3x3 conv to `mid`, BN, ReLU, dropout 0.1, 1x1."""

    def __init__(self, in_ch: int, num_classes: int, mid: int = 256, dropout: float = 0.1):
        super().__init__(ConvBNReLU(in_ch, mid, 3), nn.Dropout2d(dropout), nn.Conv2d(mid, num_classes, 1))


class PyramidPooling(nn.Module):
    """PSPNet's pyramid pooling: pool to each bin, 1x1 conv-BN-ReLU, upsample, concat with the input, fuse."""

    def __init__(self, in_ch: int, branch_ch: int, out_ch: int, bins: Sequence[int] = (1, 2, 3, 6), fuse_kernel: int = 3):
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(b), ConvBNReLU(in_ch, branch_ch, 1)) for b in bins
        )
        self.fuse = ConvBNReLU(in_ch + len(bins) * branch_ch, out_ch, fuse_kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        pooled = [F.interpolate(b(x), size=size, mode="bilinear", align_corners=False) for b in self.branches]
        return self.fuse(torch.cat([x, *pooled], dim=1))


def timm_backbone(name: str, checkpoint: Optional[str] = None, **kwargs: Any) -> nn.Module:
    """`timm.create_model(name, **kwargs)`: random weights, or those of `checkpoint` (a file the user brings,
    the spec's `model.backbone_checkpoint`) loaded by timm's own pretrained-config mechanism.
    Nothing is ever downloaded."""
    if checkpoint:
        from harness.models.weights import timm_pretrained

        return timm_pretrained(name, checkpoint, **kwargs)
    return timm.create_model(name, pretrained=False, **kwargs)


def timm_features(backbone: str, output_stride: int, out_indices: Sequence[int],
                  checkpoint: Optional[str] = None) -> nn.Module:
    """A timm backbone returning the stages in `out_indices` (1..4 are ResNet stages 1..4).

    output_stride 8 dilates stages 3 and 4 (stride 1, dilation 2 and 4), as in mmsegmentation's
    ResNet-D8 backbones.
    """
    return timm_backbone(backbone, checkpoint, features_only=True, output_stride=output_stride,
                         out_indices=tuple(out_indices))


def resize_to(logits: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Bilinear resize of `logits` to the spatial size of `like` (the input image)."""
    if logits.shape[-2:] == like.shape[-2:]:
        return logits
    return F.interpolate(logits, size=like.shape[-2:], mode="bilinear", align_corners=False)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
