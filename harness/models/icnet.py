"""ICNet (Zhao et al. 2018): an image cascade of three branches sharing one ResNet.

- sub1: the full image through three 3x3 stride-2 conv-BN-ReLU (3->32->32->64), at 1/8;
- sub2: the image at x0.5 through the stem and stages 1-2, 512 channels at 1/16;
- sub4: that feature at x0.5 through the dilated stages 3-4 and pyramid pooling, 512 channels at 1/32.

Two cascade feature fusion units join them (sub4 with sub2, then with sub1) at 128 channels; the
main classifier works at 1/4. Cascade label guidance trains a classifier on each unit's low branch
(1/16 and 1/8, weight 0.4 each, training only) beside the main output (weight 1.0).

The pyramid pooling fuses with a 1x1 conv: architectures.md puts the network at ~30.6M parameters,
which this design meets; Fast_Seg's ICNet reuses PSPNet's 3x3 bottleneck (4096->512), about 47M.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from harness.models.common import ConvBNReLU, PyramidPooling, resize_to, timm_backbone
from harness.models.registry import register
from harness.spec import Spec


class CascadeFeatureFusion(nn.Module):
    """CFF(low, high): upsample low to high's size, 3x3 dilation-2 conv + BN; high: 1x1 conv + BN;
    sum, ReLU. Returns the fused feature and the low branch (what label guidance classifies)."""

    def __init__(self, low_ch: int, high_ch: int, out_ch: int):
        super().__init__()
        self.low = ConvBNReLU(low_ch, out_ch, 3, dilation=2, relu=False)
        self.high = ConvBNReLU(high_ch, out_ch, 1, relu=False)

    def forward(self, low: torch.Tensor, high: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        low = self.low(F.interpolate(low, size=high.shape[-2:], mode="bilinear", align_corners=False))
        return F.relu(low + self.high(high)), low


def half(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=0.5, mode="bilinear", align_corners=False)


class ICNet(nn.Module):
    def __init__(self, backbone: str, num_classes: int, output_stride: int = 8, width: int = 128,
                 backbone_checkpoint: Optional[str] = None):
        super().__init__()
        self.sub1 = nn.Sequential(
            ConvBNReLU(3, 32, 3, stride=2), ConvBNReLU(32, 32, 3, stride=2), ConvBNReLU(32, 64, 3, stride=2)
        )
        # The whole classification network, less its classifier: its stages run on different inputs.
        self.backbone = timm_backbone(backbone, backbone_checkpoint, num_classes=0, global_pool="",
                                      output_stride=output_stride)
        channels = {info["module"]: info["num_chs"] for info in self.backbone.feature_info}
        stage2, stage4 = channels["layer2"], channels["layer4"]
        self.ppm = PyramidPooling(stage4, 512, 512, bins=(1, 2, 3, 6), fuse_kernel=1)
        self.reduce_sub4 = ConvBNReLU(512, 256, 1)
        self.reduce_sub2 = ConvBNReLU(stage2, 256, 1)
        self.cff_24 = CascadeFeatureFusion(256, 256, width)
        self.cff_12 = CascadeFeatureFusion(width, 64, width)
        self.classifier = nn.Conv2d(width, num_classes, 1)
        # Training only: cascade label guidance at 1/16 and 1/8.
        self.aux_classifiers = nn.ModuleList(nn.Conv2d(width, num_classes, 1) for _ in range(2))

    def forward(self, x: torch.Tensor):
        sub1 = self.sub1(x)
        net = self.backbone
        sub2 = net.layer2(net.layer1(net.maxpool(net.act1(net.bn1(net.conv1(half(x)))))))
        sub4 = self.ppm(net.layer4(net.layer3(half(sub2))))
        fused24, low24 = self.cff_24(self.reduce_sub4(sub4), self.reduce_sub2(sub2))
        fused12, low12 = self.cff_12(fused24, sub1)
        quarter = F.interpolate(fused12, scale_factor=2, mode="bilinear", align_corners=False)
        main = resize_to(self.classifier(quarter), x)
        if not self.training:
            return main
        return main, self.aux_classifiers[0](low24), self.aux_classifiers[1](low12)


@register("icnet")
def build_icnet(spec: Spec, num_classes: int) -> nn.Module:
    return ICNet(spec.model.backbone, num_classes, spec.model.output_stride,
                 backbone_checkpoint=spec.model.backbone_checkpoint)
