"""BiSeNet V1 as United-Perception builds it (up/tasks/seg/models/decoder/biseg.py `bisegnet`) on UP's
seg_resnet18 with the deep 64-64-128 stem (harness.models.seg_resnet): output stride 32, no multi-grid,
zero-init residuals, per configs/seg/BiSeNet/BiSeNet.yaml.

Context path on stages 3 (256 ch, 1/16) and 4 (512 ch, 1/32): global mean of stage 4 -> 1x1 conv-BN-ReLU 128;
ARM32(stage 4) (3x3 conv-BN-ReLU 128, then x * sigmoid(BN(1x1 conv(mean)))) + that global feature; bilinear
(align_corners=True) to stage 3's size, 3x3 conv-BN-ReLU 128 = context16; ARM16(stage 3) + context16, nearest x2,
3x3 conv-BN-ReLU 128, bilinear to the spatial path's size = context8. Spatial path on the image: 7x7 s2 64,
3x3 s2 64, 3x3 s2 64, 1x1 128 (conv-BN-ReLU each). Fusion: concat [spatial, context8] (256), 1x1 conv-BN-ReLU 256,
attention mean -> 1x1 64 -> ReLU -> 1x1 256 -> sigmoid, out = f + f * att. Head: 3x3 conv-BN-ReLU 256, 1x1 to
classes x 8 x 8 (bias), PixelShuffle(8), bilinear (align_corners=True) to the input size.
Training adds two heads (3x3 conv-BN-ReLU 64, 1x1 to classes x f x f, PixelShuffle(f)): on context8 (f = 8) and on
context16 (f = 16), each upsampled to the input; UP's loss `seg_bisegnet` is OHEM on each of main, aux8, aux16 with
weight 1 (loss1 + loss2 + loss3). Every decoder conv gets UP's kaiming_normal_(a=1) and zero bias.
Parameters (19 classes): UP 13,698,368 + 542,912 auxiliary = 14,241,280.

The backbone file (resnet18-deep.pth) fills `backbone` (layer1..4) only; see harness.models.seg_resnet.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from harness.config.spec import Spec
from harness.models.common import upsample
from harness.models.registry import register
from harness.models.seg_resnet import SegResNetModel


class CBR(nn.Sequential):
    def __init__(self, in_ch: int, out_ch: int, kernel: int = 3, stride: int = 1):
        super().__init__(nn.Conv2d(in_ch, out_ch, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(out_ch),
                         nn.ReLU(inplace=True))


class AttentionRefinement(nn.Module):
    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv = CBR(in_ch, out_ch, 3)
        self.gate = nn.Sequential(nn.Conv2d(out_ch, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        return x * self.gate(x.mean(dim=(2, 3), keepdim=True))


class FeatureFusion(nn.Module):
    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv = CBR(in_ch, out_ch, 1)
        self.gate = nn.Sequential(nn.Conv2d(out_ch, out_ch // 4, 1, bias=False), nn.ReLU(inplace=True),
                                  nn.Conv2d(out_ch // 4, out_ch, 1, bias=False), nn.Sigmoid())

    def forward(self, spatial: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        f = self.conv(torch.cat([spatial, context], dim=1))
        return f + f * self.gate(f.mean(dim=(2, 3), keepdim=True))


class ShuffleHead(nn.Sequential):
    """3x3 conv-BN-ReLU to `mid`, 1x1 conv to classes * factor^2, PixelShuffle(factor)."""

    def __init__(self, in_ch: int, mid: int, num_classes: int, factor: int):
        super().__init__(CBR(in_ch, mid, 3), nn.Conv2d(mid, num_classes * factor * factor, 1),
                         nn.PixelShuffle(factor))


class BiSeNetV1(SegResNetModel):
    def __init__(self, backbone: str = "resnet18", num_classes: int = 19, output_stride: int = 32, width: int = 128):
        super().__init__()
        self.build_encoder(backbone, output_stride, multi_grid=False)
        stage3, stage4 = self.backbone.channels()[2:]
        self.spatial = nn.Sequential(CBR(3, 64, 7, 2), CBR(64, 64, 3, 2), CBR(64, 64, 3, 2), CBR(64, width, 1))
        self.global_context = CBR(stage4, width, 1)
        self.arm32, self.arm16 = AttentionRefinement(stage4, width), AttentionRefinement(stage3, width)
        self.refine32, self.refine16 = CBR(width, width, 3), CBR(width, width, 3)
        self.ffm = FeatureFusion(2 * width, 2 * width)
        self.head = ShuffleHead(2 * width, 256, num_classes, 8)
        # Training only (UP's conv_out16 / conv_out32).
        self.aux_head8 = ShuffleHead(width, 64, num_classes, 8)
        self.aux_head16 = ShuffleHead(width, 64, num_classes, 16)
        for name, module in self.named_modules():
            if isinstance(module, nn.Conv2d) and not name.startswith(("stem", "backbone")):
                nn.init.kaiming_normal_(module.weight, a=1)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor):
        _, _, stage3, stage4 = self.encode(x)
        context32 = self.arm32(stage4) + self.global_context(stage4.mean(dim=(2, 3), keepdim=True))
        context16 = self.refine32(upsample(context32, stage3.shape[-2:]))
        context8 = self.refine16(F.interpolate(self.arm16(stage3) + context16, scale_factor=2, mode="nearest"))
        spatial = self.spatial(x)
        context8 = upsample(context8, spatial.shape[-2:])
        main = upsample(self.head(self.ffm(spatial, context8)), x.shape[-2:])
        if not self.training:
            return main
        return (main, upsample(self.aux_head8(context8), x.shape[-2:]),
                upsample(self.aux_head16(context16), x.shape[-2:]))


@register("bisenet")
def build_bisenet(spec: Spec, num_classes: int) -> nn.Module:
    return BiSeNetV1(spec.model.backbone, num_classes, spec.model.output_stride)
