"""DFNet1 and DFNet2 (Li et al., "Partial Order Pruning", CVPR 2019) as segmentation feature extractors.

Both are plain stacks of basic residual blocks after a two-conv stride-4 stem. A DFNet returns the three
taps lxtGH's segmentation networks read (a list, like a timm `features_only` model) and describes them
in a timm `FeatureInfo`, so any head can ask `backbone.feature_info.channels()` / `.reduction()`:

    DFNet1: 128 @ 1/16, 256 @ 1/32, 512 @ 1/32
    DFNet2: 128 @ 1/8,  256 @ 1/16, 512 @ 1/32

The layers are those of United-Perception's `dfnetv1` / `dfnetv2` encoders
(up/tasks/seg/models/encoder/dfnet_encoder.py): stem 3x3/2 conv 3->32, BN, ReLU, 3x3/2 conv 32->64, BN,
ReLU; basic blocks (3x3 conv-BN-ReLU, 3x3 conv-BN, + shortcut, ReLU; bias-free convs; a 1x1/s conv-BN
shortcut where the stride or width changes). UP builds them with PyTorch's default initialisation and no
classifier (its `avgpool` has no parameters): DFNet1 8,020,128 and DFNet2 17,474,208 parameters.

Pretrained weights (UP's `saver.pretrain_model`: df1_imagenet.pth / df2_imagenet.pth). UP's loader
(saver_helper `process_checkpoint`) unwraps `model` / `state_dict`, strips a `module.` prefix; its
`_resnet_convert` does not fire (no top-level `conv1.*` / `bn1.*` names). `ModelHelper.load` then finds no
name of the whole model (`encoder.*`, `decoder.*`) and loads each child separately, non-strictly: so the
file carries the encoder's own names, the ImageNet network's:

    stage1.{0,3}.weight                                    stem convs
    stage1.{1,4}.{weight,bias,running_mean,running_var[,num_batches_tracked]}
    <stage>.<block>.{conv1,conv2}.weight, <stage>.<block>.{bn1,bn2}.<bn tensors>
    <stage>.0.downsample.0.weight, <stage>.0.downsample.1.<bn tensors>   (first block of a stage)
    fc.weight (1000x512), fc.bias                           the ImageNet DFNet's classifier (lxtGH's `fc`), if
                                                           present; UP's encoder has none and ignores it

with <stage> in stage2..stage5 (DFNet1) or stage2_1, stage2_2, stage3_1, stage3_2, stage4_1, stage4_2
(DFNet2). Our module names are the same, so `convert_imagenet_state` only strips `module.` and drops
the classifier.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from timm.models import FeatureInfo
from torch import nn

from harness.errors import BenchError


class BasicBlock(nn.Module):
    """3x3 conv-BN-ReLU, 3x3 conv-BN, plus the shortcut (1x1 conv-BN when the shape changes), ReLU."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.downsample = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + shortcut)


def residual_stage(in_ch: int, out_ch: int, blocks: int, stride: int) -> nn.Sequential:
    """`blocks` basic blocks; only the first one strides or changes the width."""
    layers = [BasicBlock(in_ch, out_ch, stride)]
    layers += [BasicBlock(out_ch, out_ch) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


@dataclass(frozen=True)
class StageDef:
    name: str  # the module name in the published checkpoints
    width: int
    blocks: int
    stride: int


@dataclass(frozen=True)
class DFNetDef:
    stages: tuple[StageDef, ...]
    taps: tuple[str, ...]  # the stages whose outputs the segmentation heads read


# The layer tables of the paper (architectures.md, "DFNet layer tables").
DFNET_DEFS: dict[str, DFNetDef] = {
    "dfnet1": DFNetDef(
        stages=(
            StageDef("stage2", 64, 3, 2),
            StageDef("stage3", 128, 3, 2),
            StageDef("stage4", 256, 3, 2),
            StageDef("stage5", 512, 1, 1),
        ),
        taps=("stage3", "stage4", "stage5"),
    ),
    "dfnet2": DFNetDef(
        stages=(
            StageDef("stage2_1", 64, 2, 2),
            StageDef("stage2_2", 128, 1, 1),
            StageDef("stage3_1", 128, 10, 2),
            StageDef("stage3_2", 256, 1, 1),
            StageDef("stage4_1", 256, 4, 2),
            StageDef("stage4_2", 512, 2, 1),
        ),
        taps=("stage2_2", "stage3_2", "stage4_2"),
    ),
}
STEM_STRIDE = 4
OUTPUT_STRIDE = 32


class DFNet(nn.Module):
    """A DFNet trunk; `forward` returns the list of its segmentation taps, shallowest first."""

    def __init__(self, definition: DFNetDef):
        super().__init__()
        self.stage1 = nn.Sequential(  # the stem: two stride-2 conv-BN-ReLU, 3 -> 32 -> 64
            nn.Conv2d(3, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU(inplace=True),
            nn.Conv2d(32, 64, 3, 2, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
        )
        self.stage_names = [s.name for s in definition.stages]
        self.tap_names = set(definition.taps)
        in_ch, reduction, info = 64, STEM_STRIDE, []
        for stage in definition.stages:
            self.add_module(stage.name, residual_stage(in_ch, stage.width, stage.blocks, stage.stride))
            in_ch, reduction = stage.width, reduction * stage.stride
            if stage.name in self.tap_names:
                info.append({"num_chs": stage.width, "reduction": reduction, "module": stage.name})
        self.feature_info = FeatureInfo(info, out_indices=tuple(range(len(info))))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stage1(x)
        taps = []
        for name in self.stage_names:
            x = getattr(self, name)(x)
            if name in self.tap_names:
                taps.append(x)
        return taps


IMAGENET_CLASSIFIER_PREFIX = "fc."


def convert_imagenet_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A df1/df2_imagenet.pth state dict in our DFNet's names: `module.` stripped, the classifier dropped."""
    converted = {}
    for name, tensor in state.items():
        if name.startswith("module."):
            name = name[len("module."):]
        if name.startswith(IMAGENET_CLASSIFIER_PREFIX):
            continue
        converted[name] = tensor
    return converted


def dfnet(name: str, output_stride: int = OUTPUT_STRIDE) -> DFNet:
    """Build `dfnet1` or `dfnet2` with random weights (starting weights come from harness.models.weights)."""
    if name not in DFNET_DEFS:
        raise BenchError(f"model.backbone '{name}' is not a DFNet; use one of {', '.join(DFNET_DEFS)}")
    if output_stride != OUTPUT_STRIDE:
        # The published networks, and the heads trained on them, are stride 32; dilating them is not in any source.
        raise BenchError(f"model.output_stride {output_stride}: {name} has output stride {OUTPUT_STRIDE} only; "
                         f"set model.output_stride: {OUTPUT_STRIDE}")
    return DFNet(DFNET_DEFS[name])
