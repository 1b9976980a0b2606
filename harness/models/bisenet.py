"""BiSeNet V1 (Yu et al. 2018) as lxtGH Fast_Seg trains it: a deep-stem ResNet-18 context path with
two attention refinement modules and a global-pool branch, a three-conv spatial path at 1/8, the
feature fusion module, and two auxiliary heads on the refined context features (training only)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from harness.models.common import ConvBNReLU, resize_to, timm_features
from harness.models.registry import register
from harness.spec import Spec


class AttentionRefinement(nn.Module):
    """3x3 conv-BN-ReLU, then a channel attention: global pool, 1x1 conv + BN, sigmoid, multiply."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv = ConvBNReLU(in_ch, out_ch, 3)
        self.attention = nn.Sequential(nn.AdaptiveAvgPool2d(1), ConvBNReLU(out_ch, out_ch, 1, relu=False), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        return x * self.attention(x)


class FeatureFusion(nn.Module):
    """Concatenate, 1x1 conv-BN-ReLU, channel attention (pool, 1x1, ReLU, 1x1, sigmoid); out = f + f * att."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv = ConvBNReLU(in_ch, out_ch, 1)
        self.attention = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Conv2d(out_ch, out_ch, 1, bias=False), nn.ReLU(inplace=True),
            nn.Conv2d(out_ch, out_ch, 1, bias=False), nn.Sigmoid(),
        )

    def forward(self, spatial: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        fused = self.conv(torch.cat([spatial, context], dim=1))
        return fused + fused * self.attention(fused)


def seg_head(in_ch: int, mid: int, num_classes: int) -> nn.Sequential:
    return nn.Sequential(ConvBNReLU(in_ch, mid, 3), nn.Conv2d(mid, num_classes, 1))


class BiSeNetV1(nn.Module):
    def __init__(self, backbone: str, num_classes: int, output_stride: int = 32, width: int = 128,
                 backbone_checkpoint: Optional[str] = None):
        super().__init__()
        self.context = timm_features(backbone, output_stride, (2, 3, 4), backbone_checkpoint)
        stage2, stage3, stage4 = self.context.feature_info.channels()
        self.spatial = nn.Sequential(
            ConvBNReLU(3, 64, 7, stride=2), ConvBNReLU(64, 64, 3, stride=2), ConvBNReLU(64, 64, 3, stride=2),
            ConvBNReLU(64, width, 1),
        )
        self.global_context = nn.Sequential(nn.AdaptiveAvgPool2d(1), ConvBNReLU(stage4, width, 1))
        self.arm32, self.arm16 = AttentionRefinement(stage4, width), AttentionRefinement(stage3, width)
        self.refine32, self.refine16 = ConvBNReLU(width, width, 3), ConvBNReLU(width, width, 3)
        self.ffm = FeatureFusion(2 * width, 2 * width)
        self.head = seg_head(2 * width, 64, num_classes)
        # Training only: one head on each refined context feature (at 1/16 and 1/8).
        self.aux_heads = nn.ModuleList(seg_head(width, width, num_classes) for _ in range(2))

    def forward(self, x: torch.Tensor):
        spatial = self.spatial(x)
        stage2, stage3, stage4 = self.context(x)
        context32 = self.arm32(stage4) + self.global_context(stage4)  # the 1x1 global feature broadcasts
        context16 = self.refine32(F.interpolate(context32, size=stage3.shape[-2:], mode="bilinear", align_corners=False))
        context = self.arm16(stage3) + context16
        context8 = self.refine16(F.interpolate(context, size=stage2.shape[-2:], mode="bilinear", align_corners=False))
        fused = self.ffm(spatial, resize_to(context8, spatial))
        main = resize_to(self.head(fused), x)
        if not self.training:
            return main
        return main, self.aux_heads[0](context16), self.aux_heads[1](context8)


@register("bisenet")
def build_bisenet(spec: Spec, num_classes: int) -> nn.Module:
    return BiSeNetV1(spec.model.backbone, num_classes, spec.model.output_stride,
                     backbone_checkpoint=spec.model.backbone_checkpoint)
