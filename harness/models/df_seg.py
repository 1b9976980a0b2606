"""DF-Seg v1 / v2 on DFNet1 / DFNet2, as United-Perception builds it (`dfnet_decoder`,
up/tasks/seg/models/decoder/dfnet_decoder.py, on the `dfnetv1` / `dfnetv2` encoders).

Taps x3, x4, x5 (shallowest first). x5 goes through UP's pyramid pooling (`PyramidPooling`, to 128
channels) and a 1x1 conv (with bias); 1x1 convs (with bias) bring x4 and x3 to 128. Two fusion nodes merge
top-down (upsample the coarser input with align_corners=True to the finer one, concatenate coarse first,
one bias-free 3x3 conv, no BN, no ReLU): first (x5, x4), then (that, x3). The head is 3x3 conv 128 -> 256
(with bias), BN, ReLU, dropout 0.1, 1x1 to the classes; its logits are upsampled (align_corners=True) to the
input size. 19 classes: 9,370,931 parameters (DFNet1) / 18,825,011 (DFNet2), UP's count.

Training returns the main logits only: UP's decoder has no auxiliary head and its loss is OHEM on the main
output (`seg_ohem`, aux_weight 0), so `loss.aux_weights` is [].

`model.eval_half_resolution` (off by default) reproduces a speed trick of lxtGH's original code, not of UP:
in eval mode the image is inferred at half its size and the logits are upsampled back.

Starting weights: `backbone` is exactly UP's encoder; `convert_backbone_state` maps df1/df2_imagenet.pth
(UP's `saver.pretrain_model`) onto it; see harness.models.dfnet for the file's key layout.
"""

from __future__ import annotations

import torch
from torch import nn

from harness.config.spec import Spec
from harness.models.common import PyramidPooling, upsample
from harness.models.dfnet import convert_imagenet_state, dfnet
from harness.models.registry import register


class FusionNode(nn.Module):
    """Upsample the coarse feature to the fine one, concatenate (coarse first), one bias-free 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.fuse = nn.Conv2d(2 * channels, channels, 3, padding=1, bias=False)

    def forward(self, coarse: torch.Tensor, fine: torch.Tensor) -> torch.Tensor:
        return self.fuse(torch.cat([upsample(coarse, fine.shape[-2:]), fine], dim=1))


class DFSeg(nn.Module):
    def __init__(self, backbone: str, num_classes: int, output_stride: int = 32, width: int = 128,
                 eval_half_resolution: bool = False):
        super().__init__()
        self.backbone = dfnet(backbone, output_stride)
        shallow, middle, deep = self.backbone.feature_info.channels()
        self.context = PyramidPooling(deep, width)
        self.project_deep = nn.Conv2d(width, width, 1)
        self.project_middle = nn.Conv2d(middle, width, 1)
        self.project_shallow = nn.Conv2d(shallow, width, 1)
        self.fuse_middle = FusionNode(width)
        self.fuse_shallow = FusionNode(width)
        self.head = nn.Sequential(
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(inplace=True),
            nn.Dropout2d(0.1), nn.Conv2d(2 * width, num_classes, 1),
        )
        self.eval_half_resolution = eval_half_resolution

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits at the shallowest tap's resolution."""
        shallow, middle, deep = self.backbone(x)
        top = self.project_deep(self.context(deep))
        fused = self.fuse_middle(top, self.project_middle(middle))
        fused = self.fuse_shallow(fused, self.project_shallow(shallow))
        return self.head(fused)

    def forward(self, x: torch.Tensor):
        size = x.shape[-2:]
        if self.training:
            return (upsample(self.logits(x), size),)  # no auxiliary heads: loss.aux_weights is []
        if self.eval_half_resolution:
            x = upsample(x, (max(size[0] // 2, 1), max(size[1] // 2, 1)))
        return upsample(self.logits(x), size)

    def convert_backbone_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """df1/df2_imagenet.pth -> `self.backbone` names (the same names; the ImageNet `fc.*` is dropped)."""
        return convert_imagenet_state(state)


@register("df_seg")
def build_df_seg(spec: Spec, num_classes: int) -> nn.Module:
    return DFSeg(spec.model.backbone, num_classes, spec.model.output_stride,
                 eval_half_resolution=spec.model.eval_half_resolution)
