"""SFNet v1 / v2 ("Semantic Flow for Fast and Accurate Scene Parsing", Li et al., ECCV 2020) on DFNet1 / DFNet2,
as lxtGH's SFSegNets builds it (`AlignNetDFnet` with `UperNetAlignHead`, fpn_dim 64, deep supervision on).

Pyramid pooling on the deepest tap starts a top-down path. At each shallower tap, a 1x1 lateral
(conv, BN, ReLU) brings the tap to 64 channels, and the flow alignment module (FAM) warps the coarser
path feature onto the lateral's grid with a learned 2-channel flow field: `f = lateral + FAM(lateral, f)`.
Each level then gets a 3x3 conv-BN-ReLU; all levels are upsampled to the finest, concatenated, and
classified (3x3 conv-BN-ReLU to 64, 1x1). In training, a deep-supervision head on every aligned level
(3x3 conv 64, BN, ReLU, dropout 0.1, 1x1) adds one auxiliary output each, coarsest first; with the three
DFNet taps there are two, matching `loss.aux_weights: [1.0, 1.0]` in experiments/_base/sf_seg.yaml.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from harness.errors import BenchError
from harness.models.common import ConvBNReLU, PyramidPooling
from harness.models.df_seg import upsample_aligned
from harness.models.dfnet import dfnet
from harness.models.registry import register
from harness.spec import Spec


def flow_warp(feature: torch.Tensor, flow: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """Resample `feature` onto a `size` grid whose points are moved by `flow`.

    `flow` is (N, 2, H, W) with H, W = size: channel 0 the x (width) and channel 1 the y (height)
    displacement, in pixels of the output grid. With zero flow this is exactly bilinear upsampling
    with align_corners=True. (The paper defines the flow in pixels; lxtGH's code divides it by the
    output size instead of (size - 1) / 2, a constant factor of about 2 the flow conv absorbs.)
    """
    height, width = int(size[0]), int(size[1])
    dtype, device = feature.dtype, feature.device
    ys = torch.linspace(-1.0, 1.0, height, dtype=dtype, device=device)
    xs = torch.linspace(-1.0, 1.0, width, dtype=dtype, device=device)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    base = torch.stack([grid_x, grid_y], dim=-1)  # grid_sample wants (x, y) in [-1, 1]
    # One output pixel is 2 / (size - 1) in align_corners=True normalised coordinates.
    pixel = torch.tensor([2.0 / max(width - 1, 1), 2.0 / max(height - 1, 1)], dtype=dtype, device=device)
    grid = base.unsqueeze(0) + flow.to(dtype).permute(0, 2, 3, 1) * pixel
    return F.grid_sample(feature, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


class FlowAlignment(nn.Module):
    """FAM: predict a flow field from the fine and the (upsampled) coarse feature, then warp the coarse one.

    Both inputs are reduced by a 1x1 conv to `flow_channels`, concatenated (coarse first) and a 3x3 conv
    predicts the 2-channel flow at the fine resolution.
    """

    def __init__(self, channels: int, flow_channels: int):
        super().__init__()
        self.reduce_coarse = nn.Conv2d(channels, flow_channels, 1, bias=False)
        self.reduce_fine = nn.Conv2d(channels, flow_channels, 1, bias=False)
        self.predict_flow = nn.Conv2d(2 * flow_channels, 2, 3, padding=1, bias=False)

    def flow(self, fine: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
        coarse_reduced = upsample_aligned(self.reduce_coarse(coarse), fine.shape[-2:])
        return self.predict_flow(torch.cat([coarse_reduced, self.reduce_fine(fine)], dim=1))

    def forward(self, fine: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
        return flow_warp(coarse, self.flow(fine, coarse), fine.shape[-2:])


def lateral(in_ch: int, out_ch: int) -> nn.Sequential:
    # The 1x1 conv keeps its bias, as in SFSegNets, so the parameter count matches the published network.
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 1), nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True))


def deep_supervision_head(channels: int, num_classes: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(inplace=True),
        nn.Dropout2d(0.1), nn.Conv2d(channels, num_classes, 1),
    )


class SFNet(nn.Module):
    def __init__(self, backbone: str, num_classes: int, output_stride: int = 32, width: int = 64):
        super().__init__()
        self.backbone = dfnet(backbone, output_stride)
        *shallower, deepest = self.backbone.feature_info.channels()
        self.context = nn.Sequential(PyramidPooling(deepest, width, width, bins=(1, 2, 3, 6), fuse_kernel=1), nn.Dropout2d(0.1))
        # One entry per shallower tap, indexed like the taps (0 = shallowest).
        self.laterals = nn.ModuleList(lateral(ch, width) for ch in shallower)
        self.align = nn.ModuleList(FlowAlignment(width, width // 2) for _ in shallower)
        self.smooth = nn.ModuleList(ConvBNReLU(width, width, 3) for _ in shallower)
        self.deep_supervision = nn.ModuleList(deep_supervision_head(width, num_classes) for _ in shallower)
        self.fuse = ConvBNReLU((len(shallower) + 1) * width, width, 3)
        self.classifier = nn.Conv2d(width, num_classes, 1)

    def forward(self, x: torch.Tensor):
        *shallower, deepest = self.backbone(x)
        path = self.context(deepest)
        levels = [path]  # coarsest first
        aux = []
        for i in reversed(range(len(shallower))):
            fine = self.laterals[i](shallower[i])
            path = fine + self.align[i](fine, path)
            levels.append(self.smooth[i](path))
            if self.training:
                aux.append(self.deep_supervision[i](path))
        finest = levels[-1].shape[-2:]
        fused = self.fuse(torch.cat([upsample_aligned(level, finest) for level in reversed(levels)], dim=1))
        main = upsample_aligned(self.classifier(fused), x.shape[-2:])
        if not self.training:
            return main
        return (main, *aux)


@register("sf_seg")
def build_sf_seg(spec: Spec, num_classes: int) -> nn.Module:
    if spec.model.eval_half_resolution:
        raise BenchError(f"row '{spec.row}': model.eval_half_resolution is DF-Seg's speed trick; sf_seg does not use it, remove it from the spec")
    return SFNet(spec.model.backbone, num_classes, spec.model.output_stride)
