"""UNet (Ronneberger et al. 2015), the plain five-level network with batch norm and no pretrained
backbone: encoder levels 64..1024, each two 3x3 conv-BN-ReLU with 2x2 max-pooling between; decoder
2x2 stride-2 transposed convs that halve the channels, concatenated with the skip, two 3x3
conv-BN-ReLU; a 1x1 classifier. Any input size: padded to a multiple of 16, the output cropped back."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from harness.models.common import ConvBNReLU
from harness.models.registry import register
from harness.spec import Spec


def double_conv(in_ch: int, out_ch: int) -> nn.Sequential:
    return nn.Sequential(ConvBNReLU(in_ch, out_ch, 3), ConvBNReLU(out_ch, out_ch, 3))


class Up(nn.Module):
    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.up = nn.ConvTranspose2d(in_ch, out_ch, 2, stride=2)
        self.conv = double_conv(2 * out_ch, out_ch)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([skip, self.up(x)], dim=1))


class UNet(nn.Module):
    def __init__(self, num_classes: int, widths: tuple[int, ...] = (64, 128, 256, 512, 1024)):
        super().__init__()
        self.multiple = 2 ** (len(widths) - 1)
        self.encoder = nn.ModuleList(double_conv(a, b) for a, b in zip((3, *widths), widths))
        self.decoder = nn.ModuleList(Up(a, b) for a, b in zip(widths[:0:-1], widths[-2::-1]))
        self.classifier = nn.Conv2d(widths[0], num_classes, 1)

    def forward(self, x: torch.Tensor):
        height, width = x.shape[-2:]
        pad_h, pad_w = -height % self.multiple, -width % self.multiple
        x = F.pad(x, (0, pad_w, 0, pad_h))
        skips = []
        for level, block in enumerate(self.encoder):
            x = block(F.max_pool2d(x, 2) if level else x)
            skips.append(x)
        for up, skip in zip(self.decoder, reversed(skips[:-1])):
            x = up(x, skip)
        main = self.classifier(x)[..., :height, :width]
        return (main,) if self.training else main  # no auxiliary heads


@register("unet")
def build_unet(spec: Spec, num_classes: int) -> nn.Module:
    return UNet(num_classes)
