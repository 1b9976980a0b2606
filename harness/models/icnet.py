"""ICNet as United-Perception (UP) built it: `icnet_encoder` + `icnet_decoder` at commit c477a744
(up/tasks/seg/models/encoder/icnet.py, decoder/icnet.py, components.py), 30,711,968 parameters with
19 classes (UP's own classes counted; the UP README says 30.71M).

Encoder (an image cascade over one deep-stem ResNet-50, UP's `seg_resnet50`):
- sub1: the full image through three 3x3 stride-2 conv-BN-ReLU (3->32->32->64), at 1/8;
- sub2: the image halved (bilinear, align_corners=True) through the ResNet stem (3x3 convs 64-64-128,
  BN, ReLU, 3x3/2 max-pool with ceil_mode=True, as UP's) and stages 1-2: 512 channels at 1/16;
- sub4: that feature halved again through stages 3-4 (dilation 2 and 4, stride 1: UP's
  replace_stride_with_dilation [False, True, True]), then UP's pyramid pooling (`PSPModule`: bins 1, 2,
  3, 6, each 1x1 conv + BN without ReLU; the pooled maps first, the input last in the concat; a 1x1 conv
  with padding=1 (it grows the map by one pixel on each side) + BN + ReLU + Dropout2d(0.1) to 512);
- 1x1 conv-BN-ReLU 512->256 on sub4 and on sub2.
Decoder: cascade feature fusion CFF(sub4, sub2) and CFF(., sub1) to 128 channels; x2 upsampling,
a 1x1 classifier (no bias) at 1/4, then x4 upsampling and a resize to the input size.
Every resize is bilinear with align_corners=True, as UP's.

Training outputs, as UP's decoder and its `seg_icnet` loss (CriterionICNet) use them:
main (weight 1.0), the 1/4 logits, the 1/8 and 1/16 cascade-label-guidance logits (each CFF's low branch
through a 1x1 classifier without bias), weight 0.4 each; UP applies the same OHEM cross-entropy
(thresh 0.7, min_kept 100000) to all four after upsampling each to the label size with
align_corners=True. This module returns the auxiliary logits already upsampled that way (the label is
the input's size), so the loss's own resize (align_corners=False) is not applied to them.

Backbone and its checkpoint. `self.backbone` is timm's `resnet50s` (deep stem 64-64-128, output stride 8),
whose parameter names are those of UP's seg ResNet (`conv1.0/1/3/4/6`, `bn1`, `layer1..4.N.conv1..3`,
`bn1..3`, `downsample.0/1`) and whose shapes and dilations are the same; only its max-pool is replaced
by UP's ceil_mode one, and its last BN of each bottleneck starts at zero (UP's zero_init_residual: True,
timm's zero_init_last). UP's config names `./icnet_r50_pretrain.pth` ("you may need convert key").
UP's loader (saver_helper.process_checkpoint with `_resnet_convert`, then ModelHelper.load) fills the
encoder's ResNet completely only from names of the whole UP model, `backbone.backbone.<resnet name>`
(the encoder is the net's `backbone`, its ResNet the encoder's `backbone`): names without a prefix match
nothing, and `backbone.<resnet name>` loses the stem, which `_resnet_convert` renames to `layer0.*`
(checked by running UP's own loader on synthetic files). `convert_backbone_state` therefore maps
`backbone.backbone.X` -> `X`; names that already are plain ResNet names (an unconverted deep-stem ImageNet
file, the conversion UP left to its users) are kept as they are; an ImageNet classifier `fc.*` is dropped.
Everything outside the ResNet (sub1, pyramid pooling, reductions, fusion, classifiers) starts random, as in UP.
"""

from __future__ import annotations

from typing import Any, cast

import timm
import torch
import torch.nn.functional as F
from torch import nn

from harness.config.spec import Spec
from harness.models.common import ConvBNReLU, PyramidPooling, upsample
from harness.models.registry import register

UP_BACKBONE = "resnet50s"  # UP's seg_resnet50: deep stem 64-64-128
FILE_PREFIX = "backbone.backbone."  # where UP's whole model keeps the encoder's ResNet


def rescale(x: torch.Tensor, factor: float) -> torch.Tensor:
    return F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=True)


class CascadeFusion(nn.Module):
    """CFF(low, high): low resized to high's size, 3x3 dilation-2 conv + BN; high 1x1 conv + BN; sum, ReLU.
    Returns the fused map and the low branch (what cascade label guidance classifies)."""

    def __init__(self, low_ch: int, high_ch: int, out_ch: int):
        super().__init__()
        self.low = ConvBNReLU(low_ch, out_ch, 3, dilation=2, relu=False)
        self.high = ConvBNReLU(high_ch, out_ch, 1, relu=False)

    def forward(self, low: torch.Tensor, high: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        low = self.low(upsample(low, high.shape[-2:]))
        return F.relu(low + self.high(high)), low


class ICNet(nn.Module):
    def __init__(self, num_classes: int, backbone: str = UP_BACKBONE, width: int = 128):
        super().__init__()
        self.sub1 = nn.Sequential(
            ConvBNReLU(3, 32, 3, stride=2), ConvBNReLU(32, 32, 3, stride=2), ConvBNReLU(32, 64, 3, stride=2)
        )
        # The classification network less its classifier: its stages run on two different inputs.
        self.backbone = timm.create_model(backbone, pretrained=False, num_classes=0, global_pool="", output_stride=8)
        self.backbone.maxpool = nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True)  # UP's seg ResNet pools so
        feature_info = cast(list[dict[str, Any]], self.backbone.feature_info)
        channels = {info["module"]: info["num_chs"] for info in feature_info}
        self.pyramid = PyramidPooling(channels["layer4"], 512)
        self.reduce_sub4 = ConvBNReLU(512, 256, 1)
        self.reduce_sub2 = ConvBNReLU(channels["layer2"], 256, 1)
        self.cff_24 = CascadeFusion(256, 256, width)
        self.cff_12 = CascadeFusion(width, 64, width)
        self.classifier = nn.Conv2d(width, num_classes, 1, bias=False)
        # Training only: cascade label guidance on each fusion's low branch (1/16, then 1/8).
        self.aux_guidance_16 = nn.Conv2d(width, num_classes, 1, bias=False)
        self.aux_guidance_8 = nn.Conv2d(width, num_classes, 1, bias=False)

    def cascade(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every intermediate map, by name (the structure tests pin their shapes)."""
        # A timm ResNet that create_model types as nn.Module; its stages are added by name (add_module), so no
        # static type sees them.
        net: Any = self.backbone
        out: dict[str, torch.Tensor] = {"sub1": self.sub1(x)}
        out["stem"] = net.maxpool(net.act1(net.bn1(net.conv1(rescale(x, 0.5)))))
        out["stage1"] = net.layer1(out["stem"])
        out["stage2"] = net.layer2(out["stage1"])
        out["stage3"] = net.layer3(rescale(out["stage2"], 0.5))
        out["stage4"] = net.layer4(out["stage3"])
        out["pyramid"] = self.pyramid(out["stage4"])
        out["fused_24"], out["low_24"] = self.cff_24(self.reduce_sub4(out["pyramid"]), self.reduce_sub2(out["stage2"]))
        out["fused_12"], out["low_12"] = self.cff_12(out["fused_24"], out["sub1"])
        out["logits_4"] = self.classifier(rescale(out["fused_12"], 2))
        return out

    def forward(self, x: torch.Tensor):
        size = x.shape[-2:]
        out = self.cascade(x)
        main = upsample(rescale(out["logits_4"], 4), size)  # UP: x4, then to the image (label) size
        if not self.training:
            return main
        guidance_8 = self.aux_guidance_8(out["low_12"])
        guidance_16 = self.aux_guidance_16(out["low_24"])
        return main, upsample(out["logits_4"], size), upsample(guidance_8, size), upsample(guidance_16, size)

    def convert_backbone_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """UP's `icnet_r50_pretrain.pth` layout (`backbone.backbone.<resnet name>`) -> `self.backbone` names."""
        converted = {}
        for name, tensor in state.items():
            if name.startswith(FILE_PREFIX):
                name = name[len(FILE_PREFIX):]
            if name.startswith("fc."):
                continue  # an ImageNet classifier
            converted[name] = tensor
        return converted


@register("icnet")
def build_icnet(spec: Spec, num_classes: int) -> nn.Module:
    return ICNet(num_classes, backbone=spec.model.backbone)
