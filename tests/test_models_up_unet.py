"""UNet is United-Perception's bilinear UNet (UP, commit c477a744): its size, its shapes, a main output only,
that UP's ResNet-50 pretrain file fills none of it, and that it learns."""

from __future__ import annotations

import re

import pytest
import torch

from harness.models.common import count_parameters
from harness.models.unet import UNet
from tests.helpers import assert_segmentation_outputs
from tests.test_models_up_icnet import up_resnet50_state

pytestmark = pytest.mark.usefixtures("one_thread")

UP_README_PARAMS = 17_270_000  # ../shared/reference/united-perception/README.md: "UNet | ... | 17.27M"
UP_MEASURED_PARAMS = 17_268_563  # UP's UNet_Encoder(3) + UNet_Decoder(num_classes=19) at c477a744, sum(p.numel())

# Our names -> UP's names (unet_encoder.py: inc, down1-4.maxpool_conv.1; unet_decoder.py: up1-4.conv, outc.conv;
# both DoubleConv modules keep their layers in `double_conv`), child first.
TO_UP = [
    (r"^inc\.", "encoder.inc.double_conv."),
    (r"^downs\.(\d)\.", lambda m: f"encoder.down{int(m.group(1)) + 1}.maxpool_conv.1.double_conv."),
    (r"^ups\.(\d)\.", lambda m: f"decoder.up{int(m.group(1)) + 1}.conv.double_conv."),
    (r"^classifier\.", "decoder.outc.conv."),
]


def up_name(name: str) -> str:
    for pattern, replacement in TO_UP:
        renamed = re.sub(pattern, replacement, name)
        if renamed != name:
            return renamed
    raise AssertionError(f"no UP name for {name}")


@pytest.fixture(scope="module")
def model() -> UNet:
    torch.manual_seed(0)
    return UNet(19)


def test_parameter_count_is_ups(model):
    """UP README: 17.27M; UP's own classes counted: 17,268,563."""
    count = count_parameters(model)
    assert abs(count - UP_README_PARAMS) / UP_README_PARAMS < 0.005
    assert count == UP_MEASURED_PARAMS


def test_structure_and_training_output(model):
    """UP's unet_encoder / unet_decoder (bilinear): encoder maps floor-halve (97x193 -> 6x12), 512 at the
    bottom; each decoder step upsamples x2 and pads to the skip; one training output (seg_ohem, aux_weight 0)."""
    x = torch.randn(2, 3, 97, 193)
    model.train()
    steps = []
    hooks = [up.register_forward_hook(lambda _m, _i, out: steps.append(tuple(out.shape))) for up in model.ups]
    try:
        with torch.no_grad():
            levels = [tuple(t.shape) for t in model.levels(x)]
            outputs = model(x)
    finally:
        for hook in hooks:
            hook.remove()
    assert levels == [(2, 64, 97, 193), (2, 128, 48, 96), (2, 256, 24, 48), (2, 512, 12, 24), (2, 512, 6, 12)]
    assert steps == [(2, 256, 12, 24), (2, 128, 24, 48), (2, 64, 48, 96), (2, 64, 97, 193)]
    assert isinstance(outputs, tuple) and len(outputs) == 1 and outputs[0].shape == (2, 19, 97, 193)
    # UP's decoder DoubleConv(in, out, mid=in // 2); every conv has a bias.
    assert [up[0].out_channels for up in model.ups] == [512, 256, 128, 64]
    assert all(m.bias is not None for m in model.modules() if isinstance(m, torch.nn.Conv2d))


def test_eval_returns_main_logits_at_input_size(model):
    """Contract: eval -> main logits only at the input's (odd) size; train -> main only."""
    assert_segmentation_outputs(model, num_aux=0)


def test_ups_resnet50_pretrain_file_fills_nothing(model):
    """UP's unet.yaml pretrain_model resnet50-ebb6acbb.pth: UP's loader (process_checkpoint's _resnet_convert
    renames the stem to layer0.*; ModelHelper.load matches the whole model, then each child, by name) finds no
    name of such a file among UNet's, in any layout it may have: UNet trained from random weights in UP."""
    own = model.state_dict()
    up_names = {up_name(name) for name in own}
    assert len(up_names) == len(own) == 128
    targets = [up_names] + [{n.split(".", 1)[1] for n in up_names if n.startswith(child + ".")}
                            for child in ("encoder", "decoder")]
    plain = set(up_resnet50_state())
    # _resnet_convert's renaming of the stem: conv1.* -> layer0.0.*, bn1.* -> layer0.1.*
    converted = {re.sub(r"^bn1\.", "layer0.1.", re.sub(r"^conv1\.", "layer0.0.", name)) for name in plain}
    for names in (plain, converted):
        for prefix in ("", "backbone."):
            file_names = {prefix + name for name in names}
            assert all(not (file_names & target) for target in targets)
    assert model.pretrained_file_fills_nothing is True
    assert model.convert_backbone_state(up_resnet50_state()) == {}
    assert not hasattr(model, "backbone")


