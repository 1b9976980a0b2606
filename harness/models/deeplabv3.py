"""DeepLabV3 as United-Perception builds it (up/tasks/seg/models/decoder/deeplab.py `deeplabv3`, components.ASPP,
Aux_Module) on UP's seg_resnet50/101 (harness.models.seg_resnet): output stride 8, multi-grid 4/8/16 on stage 4,
zero-init residuals, per configs/seg/deeplabv3/deeplabv3_r{50,101}.yaml.

ASPP on stage 4 (2048 ch), 256 planes per branch, concatenated in UP's order: image pooling (pool, 1x1 conv, BN,
ReLU, bilinear back), 1x1, 3x3 at rates 12, 24, 36 (conv-BN-ReLU each) -> 1280 ch; head: 3x3 conv 256 + BN + ReLU,
Dropout2d 0.1, 1x1 to classes; bilinear (align_corners=True) to the input size. Training adds UP's Aux_Module on
stage 3 (1024 ch), upsampled the same way; UP's loss (`seg_ohem`, aux_weight 0.4) is OHEM on main + 0.4 x OHEM on
aux. Decoder weights keep PyTorch's default init, as in UP. Parameters (19 classes, aux included): UP 44,158,182
(R50) / 63,150,310 (R101).

The backbone file (resnet50-ebb6acbb.pth / resnet101-2a57e44d.pth) fills `backbone` (layer1..4) only; see
harness.models.seg_resnet for its key layout and why UP leaves the stem random.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from harness.config.spec import Spec
from harness.models.common import upsample
from harness.models.registry import register
from harness.models.seg_resnet import SegResNetModel, UPAuxHead


def conv_bn_relu(in_ch: int, out_ch: int, kernel: int = 1, dilation: int = 1) -> list[nn.Module]:
    pad = dilation * (kernel - 1) // 2
    return [nn.Conv2d(in_ch, out_ch, kernel, padding=pad, dilation=dilation, bias=False), nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True)]


class AtrousPyramid(nn.Module):
    """UP's ASPP: [image pool, 1x1, 3x3 at each rate] -> concat, (len(rates) + 2) * planes channels."""

    def __init__(self, in_ch: int, planes: int = 256, rates: Sequence[int] = (12, 24, 36)):
        super().__init__()
        self.image_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), *conv_bn_relu(in_ch, planes))
        self.branches = nn.ModuleList(
            [nn.Sequential(*conv_bn_relu(in_ch, planes))]
            + [nn.Sequential(*conv_bn_relu(in_ch, planes, 3, rate)) for rate in rates]
        )
        self.out_channels = (len(rates) + 2) * planes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = upsample(self.image_pool(x), x.shape[-2:])
        return torch.cat([pooled, *(branch(x) for branch in self.branches)], dim=1)


class DeepLabV3(SegResNetModel):
    def __init__(self, backbone: str = "resnet50", num_classes: int = 19, output_stride: int = 8,
                 planes: int = 256, rates: Sequence[int] = (12, 24, 36)):
        super().__init__()
        self.build_encoder(backbone, output_stride, multi_grid=True)
        stage3, stage4 = self.backbone.channels()[2:]
        self.aspp = AtrousPyramid(stage4, planes, rates)
        self.head = nn.Sequential(*conv_bn_relu(self.aspp.out_channels, 256, 3), nn.Dropout2d(0.1),
                                  nn.Conv2d(256, num_classes, 1))
        self.aux_head = UPAuxHead(stage3, num_classes)  # UP: Aux_Module(inplanes // 2) on stage 3

    def forward(self, x: torch.Tensor):
        _, _, stage3, stage4 = self.encode(x)
        main = upsample(self.head(self.aspp(stage4)), x.shape[-2:])
        if not self.training:
            return main
        return main, upsample(self.aux_head(stage3), x.shape[-2:])


@register("deeplabv3")
def build_deeplabv3(spec: Spec, num_classes: int) -> nn.Module:
    return DeepLabV3(spec.model.backbone, num_classes, spec.model.output_stride)
