"""PSPNet as United-Perception builds it (up/tasks/seg/models/decoder/pspnet.py `pspnet`, components.PSPModule,
Aux_Module) on UP's seg_resnet50 (harness.models.seg_resnet): output stride 8, multi-grid 4/8/16 on stage 4,
zero-init residuals, per configs/seg/pspnet/pspnet.yaml.

Pyramid pooling on stage 4 (2048 ch): for bins 1, 2, 3, 6 adaptive average pool, 1x1 conv to 512, BN (no ReLU),
bilinear back (align_corners=True); concatenated as [bins..., stage 4] (4096 ch); UP's "bottleneck": a 1x1 conv
to 512 with padding=1 (so the map grows by one pixel on every side, kept as UP has it), BN, ReLU, Dropout2d 0.1;
head: 3x3 conv 512 + BN + ReLU, Dropout2d 0.1, 1x1 to classes; bilinear (align_corners=True) to the input size.
Training adds UP's Aux_Module on stage 3; UP's loss (`seg_ohem`, aux_weight 0.4) is OHEM on main + 0.4 x OHEM
on aux. Decoder weights keep PyTorch's default init, as in UP. Parameters (19 classes, aux included): UP 34,663,398.

The backbone file (resnet50-ebb6acbb.pth) fills `backbone` (layer1..4) only; see harness.models.seg_resnet.
"""

from __future__ import annotations

import torch
from torch import nn

from harness.config.spec import Spec
from harness.models.common import PyramidPooling, upsample
from harness.models.registry import register
from harness.models.seg_resnet import SegResNetModel, UPAuxHead


class PSPNet(SegResNetModel):
    def __init__(self, backbone: str = "resnet50", num_classes: int = 19, output_stride: int = 8, planes: int = 512):
        super().__init__()
        self.build_encoder(backbone, output_stride, multi_grid=True)
        stage3, stage4 = self.backbone.channels()[2:]
        self.ppm = PyramidPooling(stage4, planes)
        self.head = nn.Sequential(
            nn.Conv2d(planes, 512, 3, padding=1, bias=False), nn.BatchNorm2d(512), nn.ReLU(inplace=True),
            nn.Dropout2d(0.1), nn.Conv2d(512, num_classes, 1),
        )
        self.aux_head = UPAuxHead(stage3, num_classes)  # UP: Aux_Module(inplanes // 2) on stage 3

    def forward(self, x: torch.Tensor):
        _, _, stage3, stage4 = self.encode(x)
        main = upsample(self.head(self.ppm(stage4)), x.shape[-2:])
        if not self.training:
            return main
        return main, upsample(self.aux_head(stage3), x.shape[-2:])


@register("pspnet")
def build_pspnet(spec: Spec, num_classes: int) -> nn.Module:
    return PSPNet(spec.model.backbone, num_classes, spec.model.output_stride)
