"""United-Perception's `seg_resnet18/50/101` encoder (up/tasks/seg/models/encoder/seg_resnet.py), built from timm.

UP's seg ResNet, as its configs use it:
- deep stem: 3x3 s2 conv 3->64, BN, ReLU, 3x3 conv 64->64, BN, ReLU, 3x3 conv 64->128 (names conv1.0/.1/.3/.4/.6),
  then BN(128) `bn1`, ReLU, 3x3 s2 max pool with `ceil_mode=True` (timm pools with floor; we switch it);
- torchvision-style blocks (BasicBlock for R18, Bottleneck for R50/R101, stride on the 3x3), layer1 starting
  from 128 channels (so R18's layer1 has a 1x1 projection shortcut);
- `replace_stride_with_dilation`: output stride 8 = [False, True, True] (deeplabv3, pspnet configs), 32 = none
  (BiSeNet); the first block of a dilated stage keeps the previous stage's dilation (as timm does);
- `multi_grid: True` (deeplabv3, pspnet): the three stage-4 blocks get dilations previous*2, d*2, d*4, i.e.
  4, 8, 16 at output stride 8 (timm gives 2, 4, 4; we set the 3x3 convs' dilation and padding after building);
- init: kaiming-normal (fan_out, relu) convs, BN 1/0, and `zero_init_residual: True`: the last BN of every
  residual branch starts at 0. This is timm's ResNet init with `zero_init_last=True`.
timm `resnet50s` / `resnet101s` (and `ResNet(BasicBlock, [2, 2, 2, 2], stem_type="deep", stem_width=64)` for R18)
have this layout with the same module names, so only the pool and the multi-grid need changing.

The pretrain files UP's configs name (`saver.pretrain_model`): resnet50-ebb6acbb.pth and resnet101-2a57e44d.pth
(Hang Zhang's PyTorch-Encoding deep-stem ImageNet ResNets) and resnet18-deep.pth (lxtGH's deep-stem R18, the
"light seg" code UP copied), all in this key layout:
    conv1.0.weight, conv1.1.{weight,bias,running_mean,running_var}, conv1.3.weight, conv1.4.*, conv1.6.weight,
    bn1.*, layer{1..4}.{i}.{conv1,bn1,conv2,bn2[,conv3,bn3]}.*, layer{1..4}.0.downsample.{0,1}.*, fc.{weight,bias}
(possibly with `module.` prefixes and `num_batches_tracked` buffers).

What UP loads from it (Saver.process_checkpoint with convert=True, then ModelHelper.load): `_resnet_convert`
sees the deep-stem names and RENAMES the stem: conv1.0/.1/.3/.4/.6.* -> layer0.0.{0,1,3,4,6}.*, bn1.* ->
layer0.1.* (a layout meant for UP's detection ResNet). No whole-model name matches (UP's are `encoder.*`,
`decoder.*`), so each child loads the names it shares with the file, non-strictly: the seg encoder, whose stem
is still called conv1.*/bn1.*, gets layer1..layer4 only; its stem keeps its random init, and fc is unused.
So here the stem is `model.stem` (random, UP's init) and `model.backbone` holds layer1..layer4, exactly what
the file fills; `convert_backbone_state` keeps `layer1..4.*` under the same names and drops conv1.*, bn1.*
(UP renames them away) and fc.*. (The table's commit da5b32c renames the stem the same
way, unconditionally, in `pod_resnet_convert`.)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import timm
import torch
from timm.models.resnet import BasicBlock, Bottleneck, ResNet
from torch import nn

from harness.errors import BenchError

# UP encoder type -> (block, blocks per stage); timm model with the same layout (None: built from ResNet directly).
DEPTHS = {
    "resnet18": (BasicBlock, (2, 2, 2, 2), None),
    "resnet50": (Bottleneck, (3, 4, 6, 3), "resnet50s"),
    "resnet101": (Bottleneck, (3, 4, 23, 3), "resnet101s"),
}
MULTI_GRID = (2, 2, 4)  # UP's stage-4 grids when `multi_grid: True`
STAGES = ("layer1", "layer2", "layer3", "layer4")
CLASSIFIER_PREFIX = "fc."


def seg_resnet_depth(name: str) -> str:
    """'resnet50', 'seg_resnet50', 'resnet50s', 'res50' ... -> 'resnet50'."""
    key = name.lower().removeprefix("seg_").removeprefix("tu-")
    key = key.removesuffix("s") if key.endswith(("50s", "101s")) else key
    key = key.replace("res", "resnet", 1) if key.startswith("res") and not key.startswith("resnet") else key
    if key not in DEPTHS:
        raise BenchError(f"model.backbone '{name}' is not one of UP's seg ResNets; use one of {', '.join(DEPTHS)}")
    return key


def dilation_flags(output_stride: int) -> tuple[bool, bool, bool]:
    """UP's `replace_stride_with_dilation` for stages 2-4 giving this output stride."""
    flags = {8: (False, True, True), 16: (False, False, True), 32: (False, False, False)}
    if output_stride not in flags:
        raise BenchError(f"model.output_stride {output_stride} is not supported by UP's seg ResNet; use 8, 16 or 32")
    return flags[output_stride]


class DeepStem(nn.Module):
    """conv1 (three 3x3 convs), bn1, ReLU, 3x3 s2 max pool with ceil_mode=True: 1/4 resolution, 128 channels."""

    def __init__(self, conv1: nn.Sequential, bn1: nn.BatchNorm2d):
        super().__init__()
        self.conv1 = conv1
        self.bn1 = bn1
        self.act = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1, ceil_mode=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.act(self.bn1(self.conv1(x))))


class ResNetStages(nn.Module):
    """layer1..layer4 under the pretrain file's names; returns the four stage outputs."""

    def __init__(self, net: ResNet):
        super().__init__()
        for name in STAGES:
            setattr(self, name, getattr(net, name))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for name in STAGES:
            x = getattr(self, name)(x)
            features.append(x)
        return features

    def channels(self) -> list[int]:
        out = []
        for name in STAGES:
            last = getattr(self, name)[-1]
            norm = cast(nn.BatchNorm2d, last.bn3 if isinstance(last, Bottleneck) else last.bn2)
            out.append(norm.num_features)
        return out


def apply_multi_grid(stage: nn.Sequential, previous_dilation: int, dilation: int, grids: Sequence[int]) -> None:
    """UP's multi-grid: block 0's 3x3 conv gets previous_dilation*grids[0], block i>0 dilation*grids[i]."""
    for index, block in enumerate(stage):
        if not isinstance(block, Bottleneck):
            raise BenchError("UP's multi-grid needs Bottleneck blocks (its BasicBlock refuses dilation > 1)")
        d = (previous_dilation if index == 0 else dilation) * grids[index]
        block.conv2.dilation, block.conv2.padding = (d, d), (d, d)


def build_seg_resnet(name: str, output_stride: int = 8, multi_grid: bool = False,
                     zero_init_residual: bool = True) -> tuple[DeepStem, ResNetStages]:
    """UP's seg_resnet{18,50,101}(replace_stride_with_dilation, multi_grid, zero_init_residual), random weights."""
    depth = seg_resnet_depth(name)
    block, layers, timm_name = DEPTHS[depth]
    dilation_flags(output_stride)  # validates
    common: dict[str, Any] = dict(num_classes=0, global_pool="", output_stride=output_stride,
                                  zero_init_last=zero_init_residual)
    if timm_name:
        net = cast(ResNet, timm.create_model(timm_name, pretrained=False, **common))
    else:
        # timm annotates `block` as an instance (BasicBlock | Bottleneck) where it takes the class.
        net = ResNet(block, layers, stem_type="deep", stem_width=64, **common)  # type: ignore[arg-type]
    if multi_grid:
        stage4_dilation = max(1, 32 // output_stride)
        apply_multi_grid(cast(nn.Sequential, net.layer4), max(1, stage4_dilation // 2), stage4_dilation, MULTI_GRID)
    return DeepStem(net.conv1, cast(nn.BatchNorm2d, net.bn1)), ResNetStages(net)


class UPAuxHead(nn.Sequential):
    """UP's Aux_Module on stage 3: 3x3 conv (with bias) to 256, BN, ReLU, Dropout2d 0.1, 1x1 conv to classes."""

    def __init__(self, in_ch: int, num_classes: int):
        super().__init__(
            nn.Conv2d(in_ch, 256, 3, padding=1), nn.BatchNorm2d(256), nn.ReLU(inplace=True),
            nn.Dropout2d(0.1), nn.Conv2d(256, num_classes, 1),
        )


class SegResNetModel(nn.Module):
    """Base of the UP decoders on seg_resnet: `stem` (random, as UP leaves it) + `backbone` (layer1..4)."""

    stem: DeepStem
    backbone: ResNetStages

    def build_encoder(self, name: str, output_stride: int, multi_grid: bool) -> None:
        self.stem, self.backbone = build_seg_resnet(name, output_stride, multi_grid, zero_init_residual=True)

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.backbone(self.stem(x))

    def convert_backbone_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The pretrain file's layer1..4 tensors under `self.backbone`'s names (the same); stem and fc dropped."""
        out = {}
        for key, value in state.items():
            key = key.removeprefix("module.")
            if key.split(".", 1)[0] in STAGES:
                out[key] = value
        return out
