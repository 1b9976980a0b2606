"""DF-Seg v1 / v2 (lxtGH's DFSegNet on the DFNet1 / DFNet2 backbones, "Partial Order Pruning", CVPR 2019).

Pyramid pooling on the deepest tap, 1x1 convs bring every tap to 128 channels, two fusion nodes merge
them top-down (upsample the coarser input, concatenate, 3x3 conv), then the segmentation head
(3x3 conv 128 -> 256, BN, ReLU, dropout 0.1, 1x1). Trained with OHEM on the main output only.

`model.eval_half_resolution` reproduces the speed trick of lxtGH's code: in eval mode the image is
inferred at half its size and the logits are upsampled back. It is off by default.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from harness.models.common import PyramidPooling
from harness.models.dfnet import dfnet
from harness.models.registry import register
from harness.spec import Spec


def upsample_aligned(x: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """Bilinear resize with align_corners=True, the convention of lxtGH's DFNet and SFNet code."""
    if x.shape[-2:] == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


class FusionNode(nn.Module):
    """Upsample the coarse feature to the fine one, concatenate, and mix with one 3x3 conv.

    The conv is plain (no BN, no ReLU), as in lxtGH's DFSegNet.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.fuse = nn.Conv2d(2 * channels, channels, 3, padding=1, bias=False)

    def forward(self, coarse: torch.Tensor, fine: torch.Tensor) -> torch.Tensor:
        return self.fuse(torch.cat([upsample_aligned(coarse, fine.shape[-2:]), fine], dim=1))


class DFSeg(nn.Module):
    def __init__(self, backbone: str, num_classes: int, output_stride: int = 32, width: int = 128,
                 eval_half_resolution: bool = False):
        super().__init__()
        self.backbone = dfnet(backbone, output_stride)
        shallow, middle, deep = self.backbone.feature_info.channels()
        self.context = nn.Sequential(PyramidPooling(deep, width, width, bins=(1, 2, 3, 6), fuse_kernel=1), nn.Dropout2d(0.1))
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
            return (upsample_aligned(self.logits(x), size),)  # no auxiliary heads: loss.aux_weights is []
        if self.eval_half_resolution:
            x = upsample_aligned(x, (max(size[0] // 2, 1), max(size[1] // 2, 1)))
        return upsample_aligned(self.logits(x), size)


@register("df_seg")
def build_df_seg(spec: Spec, num_classes: int) -> nn.Module:
    return DFSeg(spec.model.backbone, num_classes, spec.model.output_stride,
                 eval_half_resolution=spec.model.eval_half_resolution)
