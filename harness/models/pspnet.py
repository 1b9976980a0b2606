"""PSPNet (Zhao et al. 2017) as mmsegmentation's PSPNet R50-D8: dilated ResNet at output stride 8,
pyramid pooling on stage 4, FCN auxiliary head on stage 3.

Not segmentation-models-pytorch's `PSPNet`, which pools the undilated stride-8 stage 2.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from harness.models.common import FCNHead, PyramidPooling, resize_to, timm_features
from harness.models.registry import register
from harness.spec import Spec


class PSPNet(nn.Module):
    def __init__(self, backbone: str, num_classes: int, output_stride: int = 8, branch_channels: int = 512,
                 backbone_checkpoint: Optional[str] = None):
        super().__init__()
        self.backbone = timm_features(backbone, output_stride, (3, 4), backbone_checkpoint)
        stage3, stage4 = self.backbone.feature_info.channels()
        self.ppm = PyramidPooling(stage4, branch_channels, branch_channels, bins=(1, 2, 3, 6), fuse_kernel=3)
        self.classifier = nn.Sequential(nn.Dropout2d(0.1), nn.Conv2d(branch_channels, num_classes, 1))
        self.aux_head = FCNHead(stage3, num_classes)

    def forward(self, x: torch.Tensor):
        stage3, stage4 = self.backbone(x)
        main = resize_to(self.classifier(self.ppm(stage4)), x)
        if not self.training:
            return main
        return main, self.aux_head(stage3)


@register("pspnet")
def build_pspnet(spec: Spec, num_classes: int) -> nn.Module:
    return PSPNet(spec.model.backbone, num_classes, spec.model.output_stride,
                  backbone_checkpoint=spec.model.backbone_checkpoint)
