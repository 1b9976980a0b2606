"""UNet as United-Perception (UP) built it: `unet_encoder` + `unet_decoder` with bilinear=True at commit
c477a744 (up/tasks/seg/models/encoder/unet_encoder.py, decoder/unet_decoder.py), 17,268,563 parameters
with 19 classes (UP's own classes counted; the UP README says 17.27M).

- Double conv: (3x3 conv with bias, padding 1, BN, ReLU) twice; the first conv goes to `mid` channels.
- Encoder: double conv 3->64 at full size, then four levels of 2x2 max-pooling (floor) and a double conv:
  64->128, 128->256, 256->512, 512->512 (UP halves the deepest width, 1024 // 2, when bilinear).
- Decoder, four times: upsample x2 (bilinear, align_corners=True); zero-pad to the skip's size
  (half the difference before, the rest after, as UP); concat [skip, upsampled]; double conv
  in->out through in/2: 1024->512->256, 512->256->128, 256->128->64, 128->64->64.
- 1x1 classifier (with bias) 64->classes. Any input size comes back at that size.
Training returns `(main,)`: UP's config uses `seg_ohem` with aux_weight 0, OHEM on the main output only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from harness.config.spec import Spec
from harness.models.registry import register


class DoubleConv(nn.Sequential):
    def __init__(self, in_ch: int, out_ch: int, mid_ch: int | None = None):
        mid_ch = mid_ch or out_ch
        super().__init__(
            nn.Conv2d(in_ch, mid_ch, 3, padding=1), nn.BatchNorm2d(mid_ch), nn.ReLU(inplace=True),
            nn.Conv2d(mid_ch, out_ch, 3, padding=1), nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True),
        )


def upsample_to(x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    """x2 bilinear (align_corners=True), then zero padding up to the skip's size, split as UP splits it."""
    x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
    dy, dx = skip.shape[-2] - x.shape[-2], skip.shape[-1] - x.shape[-1]
    return F.pad(x, [dx // 2, dx - dx // 2, dy // 2, dy - dy // 2])


class UNet(nn.Module):
    """UP's bilinear UNet, trained from random weights.

    UP's unet.yaml names `resnet50-ebb6acbb.pth` (a deep-stem ResNet-50 ImageNet file) as `pretrain_model`.
    UP's loader (saver_helper.process_checkpoint, whose `_resnet_convert` only renames ResNet stem keys,
    then ModelHelper.load: the whole model first, then each child `encoder` / `decoder` separately, keeping
    only names present in the module with equal shapes) finds no shared name: UNet's tensors are named
    `encoder.inc.*`, `encoder.downN.*`, `decoder.upN.*`, `decoder.outc.*` (`inc.*`, `downN.*`, ... within
    each child), a ResNet file's `conv1.*`, `bn1.*`, `layer0..4.*`, `fc.*` (with or without a `module.` or
    `backbone.` prefix). Running UP's own loader on such files fills 0 of UNet's 128 tensors, so every
    UP UNet run trained from its random initialisation, and UP raised no error. Hence this model has no
    `backbone` that the file could fill; `pretrained_file_fills_nothing` says so, and
    `convert_backbone_state` maps every tensor of such a file to nothing.
    """

    pretrained_file_fills_nothing = True

    def __init__(self, num_classes: int):
        super().__init__()
        self.inc = DoubleConv(3, 64)
        self.downs = nn.ModuleList(DoubleConv(a, b) for a, b in ((64, 128), (128, 256), (256, 512), (512, 512)))
        self.ups = nn.ModuleList(
            DoubleConv(a, b, a // 2) for a, b in ((1024, 256), (512, 128), (256, 64), (128, 64))
        )
        self.classifier = nn.Conv2d(64, num_classes, 1)

    def levels(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The encoder's five maps, full size to 1/16."""
        maps = [self.inc(x)]
        for down in self.downs:
            maps.append(down(F.max_pool2d(maps[-1], 2)))
        return maps

    def forward(self, x: torch.Tensor):
        *skips, x = self.levels(x)
        for up, skip in zip(self.ups, reversed(skips)):
            x = up(torch.cat([skip, upsample_to(x, skip)], dim=1))
        main = self.classifier(x)
        return (main,) if self.training else main  # no auxiliary heads

    def convert_backbone_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Nothing of UP's ResNet-50 `pretrain_model` reaches a UNet tensor (see the class docstring)."""
        return {}


@register("unet")
def build_unet(spec: Spec, num_classes: int) -> nn.Module:
    return UNet(num_classes)
