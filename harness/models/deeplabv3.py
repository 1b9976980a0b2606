"""DeepLabV3 (Chen et al. 2017) on a dilated ResNet: segmentation-models-pytorch's head, plus the
FCN auxiliary head on stage 3 that torchvision and mmsegmentation train with."""

from __future__ import annotations

from typing import Optional

import segmentation_models_pytorch as smp
import torch
from torch import nn

from harness.models.common import FCNHead, resize_to, timm_backbone
from harness.models.registry import register
from harness.spec import Spec


class DeepLabV3(nn.Module):
    def __init__(self, backbone: str, num_classes: int, output_stride: int = 8, backbone_checkpoint: Optional[str] = None):
        super().__init__()
        reference = smp.DeepLabV3(
            encoder_name=f"tu-{backbone}", encoder_weights=None,
            encoder_output_stride=output_stride, classes=num_classes,
        )
        self.encoder = reference.encoder
        if backbone_checkpoint:
            # smp only loads its own hub weights; swap in the same timm feature model, loaded by timm from the file.
            self.encoder.model = timm_backbone(backbone, backbone_checkpoint, features_only=True,
                                               output_stride=output_stride, out_indices=tuple(range(5)))
        self.decoder = reference.decoder
        # smp's head upsamples by a fixed x8, wrong for sizes not divisible by 8; keep only its 1x1 conv.
        self.classifier = reference.segmentation_head[0]
        self.aux_head = FCNHead(self.encoder.out_channels[-2], num_classes)

    def forward(self, x: torch.Tensor):
        features = self.encoder(x)
        main = resize_to(self.classifier(self.decoder(features)), x)
        if not self.training:
            return main
        return main, self.aux_head(features[-2])


@register("deeplabv3")
def build_deeplabv3(spec: Spec, num_classes: int) -> nn.Module:
    return DeepLabV3(spec.model.backbone, num_classes, spec.model.output_stride, spec.model.backbone_checkpoint)
