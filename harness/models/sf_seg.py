"""SFNet v1 / v2 ("Semantic Flow for Fast and Accurate Scene Parsing", Li et al., ECCV 2020) on DFNet1 / DFNet2,
as United-Perception builds it (`sfnet_decoder` with inner_planes 128, up/tasks/seg/models/decoder/sfnet.py).

UP's pyramid pooling (harness.models.common.PyramidPooling, 512 -> 128, 2 pixels larger than its
input) on the deepest tap starts a top-down path. At each shallower tap, coarsest first, a lateral 1x1 conv
(with bias), BN, ReLU brings the tap to 128 channels and the flow alignment module (FAM) warps the path
feature onto the lateral's grid: `f = lateral + FAM(lateral, f)`. Each aligned level gets a 1x1
conv-BN-ReLU (no bias). The pooled context and the level outputs are upsampled (align_corners=True) to the
finest level, concatenated finest first, fused by a 1x1 conv-BN-ReLU (384 -> 128, no bias) and classified
by a 1x1 conv (with bias); the logits are upsampled (align_corners=True) to the input size.
19 classes: 8,587,059 parameters (DFNet1) / 18,041,139 (DFNet2), UP's count.

Batch norm: UP builds the head (`AlignHead`: the pyramid pooling, the laterals, the level and fusion ConvBnRelus,
10 batch norms) with `solo_bn` whatever the config says, i.e. per GPU over UP's 2 images, while the encoder
uses SyncBN over the global batch. Those 10 layers are `GroupedBatchNorm2d` (harness.models.common): groups of UP's
per-GPU batch on any number of processes, never SyncBatchNorm, running statistics of group 0 as UP's rank 0 kept.

Training returns the main logits only: UP's SFNet decoder has no deep-supervision heads, and its loss is
OHEM on the main output (`seg_ohem`, aux_weight 0), so `loss.aux_weights` is [].

Starting weights: `backbone` is exactly UP's encoder; `convert_backbone_state` maps df1/df2_imagenet.pth
(UP's `saver.pretrain_model`) onto it; see harness.models.dfnet for the file's key layout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from harness.config.spec import Spec
from harness.errors import BenchError
from harness.models.common import ConvBNReLU, PyramidPooling, group_batch_norms, upsample
from harness.models.dfnet import convert_imagenet_state, dfnet
from harness.models.registry import register


def flow_warp(feature: torch.Tensor, flow: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """Resample `feature` onto a `size` grid whose points are moved by `flow`, as UP's `AlignedModule` does.

    `flow` is (N, 2, H, W) with H, W = size: channel 0 the x (width), channel 1 the y (height) displacement.
    The base grid is `linspace(-1, 1)` over the output size and the flow is divided by the output width /
    height, then `grid_sample(bilinear, zeros padding)` with PyTorch's default align_corners=False (UP calls
    it without the argument). So -1 and +1 are the input's outer pixel EDGES: with zero flow the first and
    last output points read half a pixel outside the input (half the border value, zero padding), and a
    flow of 1 moves a point by W_in / (2 W_out) input pixels.
    """
    height, width = int(size[0]), int(size[1])
    dtype, device = feature.dtype, feature.device
    ys = torch.linspace(-1.0, 1.0, height, dtype=dtype, device=device)
    xs = torch.linspace(-1.0, 1.0, width, dtype=dtype, device=device)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    base = torch.stack([grid_x, grid_y], dim=-1)  # grid_sample wants (x, y)
    scale = torch.tensor([width, height], dtype=dtype, device=device)
    grid = base.unsqueeze(0) + flow.to(dtype).permute(0, 2, 3, 1) / scale
    return F.grid_sample(feature, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


class FlowAlignment(nn.Module):
    """FAM: predict a flow field from the fine and the (upsampled) coarse feature, then warp the coarse one.

    Both inputs are reduced by a bias-free 1x1 conv to `flow_channels`; the reduced coarse one is upsampled
    (align_corners=True) to the fine grid, the two are concatenated (coarse first) and a bias-free 3x3 conv
    predicts the 2-channel flow. The ORIGINAL (unreduced) coarse feature is warped.
    """

    def __init__(self, channels: int, flow_channels: int):
        super().__init__()
        self.reduce_coarse = nn.Conv2d(channels, flow_channels, 1, bias=False)
        self.reduce_fine = nn.Conv2d(channels, flow_channels, 1, bias=False)
        self.predict_flow = nn.Conv2d(2 * flow_channels, 2, 3, padding=1, bias=False)

    def flow(self, fine: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
        coarse_reduced = upsample(self.reduce_coarse(coarse), fine.shape[-2:])
        return self.predict_flow(torch.cat([coarse_reduced, self.reduce_fine(fine)], dim=1))

    def forward(self, fine: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
        return flow_warp(coarse, self.flow(fine, coarse), fine.shape[-2:])


def lateral(in_ch: int, out_ch: int) -> nn.Sequential:
    """1x1 conv WITH bias, BN, ReLU (UP's `fpn_in`)."""
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 1), nn.BatchNorm2d(out_ch), nn.ReLU())


class SFNet(nn.Module):
    def __init__(self, backbone: str, num_classes: int, output_stride: int = 32, width: int = 128):
        super().__init__()
        self.backbone = dfnet(backbone, output_stride)
        *shallower, deepest = self.backbone.feature_info.channels()
        self.context = PyramidPooling(deepest, width)
        # One entry per shallower tap, indexed like the taps (0 = shallowest).
        self.laterals = nn.ModuleList(lateral(ch, width) for ch in shallower)
        self.align = nn.ModuleList(FlowAlignment(width, width // 2) for _ in shallower)
        self.smooth = nn.ModuleList(ConvBNReLU(width, width, 1) for _ in shallower)
        self.fuse = ConvBNReLU((len(shallower) + 1) * width, width, 1)
        self.classifier = nn.Conv2d(width, num_classes, 1)
        for head in (self.context, self.laterals, self.smooth, self.fuse):  # UP's solo_bn AlignHead
            group_batch_norms(head)

    def forward(self, x: torch.Tensor):
        *shallower, deepest = self.backbone(x)
        path = self.context(deepest)
        levels = [path]  # coarsest first
        for i in reversed(range(len(shallower))):
            fine = self.laterals[i](shallower[i])
            path = fine + self.align[i](fine, path)
            levels.append(self.smooth[i](path))
        finest = levels[-1].shape[-2:]
        fused = self.fuse(torch.cat([upsample(level, finest) for level in reversed(levels)], dim=1))
        main = upsample(self.classifier(fused), x.shape[-2:])
        if not self.training:
            return main
        return (main,)  # no deep-supervision heads in UP: loss.aux_weights is []

    def convert_backbone_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """df1/df2_imagenet.pth -> `self.backbone` names (the same names; the ImageNet `fc.*` is dropped)."""
        return convert_imagenet_state(state)


@register("sf_seg")
def build_sf_seg(spec: Spec, num_classes: int) -> nn.Module:
    if spec.model.eval_half_resolution:
        raise BenchError(f"row '{spec.row}': model.eval_half_resolution is DF-Seg's speed trick; "
                         "sf_seg does not use it, remove it from the spec")
    return SFNet(spec.model.backbone, num_classes, spec.model.output_stride)
