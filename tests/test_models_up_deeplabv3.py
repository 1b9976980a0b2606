"""DeepLabV3 is United-Perception's network (up/tasks/seg/models/decoder/deeplab.py on encoder/seg_resnet.py):
same parameter count, same stage shapes and dilations, training outputs, and UP's pretrain file layout.

`up_pretrain_file` (shared with the pspnet and bisenet tests) builds a state dict with the key names and shapes
of the ImageNet files UP's configs name (resnet50-ebb6acbb.pth, resnet101-2a57e44d.pth: PyTorch-Encoding's
deep-stem ResNets; resnet18-deep.pth: lxtGH's deep-stem R18), from the recipe in UP's seg_resnet.py, not
from our model: deep stem conv1.{0,1,3,4,6} + bn1, torchvision-style blocks from 128 stem channels, fc to 1000.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from harness.models.common import count_parameters
from harness.models.deeplabv3 import DeepLabV3
from harness.models.weights import load_matching
from tests.helpers import add_batchnorm, assert_segmentation_outputs

pytestmark = pytest.mark.usefixtures("one_thread")

# UP README (../shared/reference/united-perception/README.md): "deeplabv3 R50 / R101 ... 44.16M / 63.15M";
# UP's own classes (seg_resnet50/101(multi_grid, zero_init_residual, dilation [F, T, T]) + dec_deeplabv3(2048,
# 19 classes, inner_planes 256, dilations 12/24/36), aux head included), counted: 44,158,182 / 63,150,310.
UP_PARAMS = {"resnet50": 44_158_182, "resnet101": 63_150_310}

# UP's _resnet_convert (up/utils/general/saver_helper.py) renames these file names to layer0.*; UP's seg encoder
# names its stem conv1.* / bn1.*, so they never load there (nor does fc): only layer1..4 come from the file.
UP_RENAMED_STEM = {"conv1.0.weight", "conv1.1.weight", "conv1.1.bias", "conv1.1.running_mean", "conv1.1.running_var",
                   "conv1.3.weight", "conv1.4.weight", "conv1.4.bias", "conv1.4.running_mean", "conv1.4.running_var",
                   "conv1.6.weight", "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var",
                   "bn1.num_batches_tracked"}

UP_BLOCKS = {"resnet18": ("basic", (2, 2, 2, 2)), "resnet50": ("bottleneck", (3, 4, 6, 3)),
             "resnet101": ("bottleneck", (3, 4, 23, 3))}


def up_pretrain_file(depth: str) -> dict[str, torch.Tensor]:
    """Key names and shapes of UP's pretrain file for seg_<depth>, filled with distinct random values."""
    g = torch.Generator().manual_seed(1)
    shapes: dict[str, tuple[int, ...]] = {}

    def conv(name, out_ch, in_ch, k):
        shapes[f"{name}.weight"] = (out_ch, in_ch, k, k)

    conv("conv1.0", 64, 3, 3), add_batchnorm(shapes, "conv1.1", 64), conv("conv1.3", 64, 64, 3), add_batchnorm(shapes, "conv1.4", 64)
    conv("conv1.6", 128, 64, 3), add_batchnorm(shapes, "bn1", 128)
    kind, blocks = UP_BLOCKS[depth]
    expansion = 4 if kind == "bottleneck" else 1
    inplanes = 128
    for stage, (planes, n) in enumerate(zip((64, 128, 256, 512), blocks), start=1):
        for b in range(n):
            p = f"layer{stage}.{b}"
            if kind == "basic":
                conv(f"{p}.conv1", planes, inplanes, 3), add_batchnorm(shapes, f"{p}.bn1", planes)
                conv(f"{p}.conv2", planes, planes, 3), add_batchnorm(shapes, f"{p}.bn2", planes)
            else:
                conv(f"{p}.conv1", planes, inplanes, 1), add_batchnorm(shapes, f"{p}.bn1", planes)
                conv(f"{p}.conv2", planes, planes, 3), add_batchnorm(shapes, f"{p}.bn2", planes)
                conv(f"{p}.conv3", planes * 4, planes, 1), add_batchnorm(shapes, f"{p}.bn3", planes * 4)
            if b == 0 and (stage > 1 or inplanes != planes * expansion):
                conv(f"{p}.downsample.0", planes * expansion, inplanes, 1), add_batchnorm(shapes, f"{p}.downsample.1", planes * expansion)
            inplanes = planes * expansion
    shapes["fc.weight"], shapes["fc.bias"] = (1000, inplanes), (1000,)
    state = {}
    for name, shape in shapes.items():
        if name.endswith("num_batches_tracked"):
            state[name] = torch.tensor(7)
        else:
            t = torch.rand(shape, generator=g) + 0.5
            state[name] = t if name.endswith("running_var") else t - 1.0
    return state


def check_pretrain_file_loads(model: torch.nn.Module, depth: str) -> None:
    """Every backbone tensor filled from the file; every file tensor used except the stem and fc (as UP)."""
    state = up_pretrain_file(depth)
    stem_before = {k: v.clone() for k, v in model.stem.state_dict().items()}
    converted = model.convert_backbone_state(state)
    own = model.backbone.state_dict()
    assert load_matching(model.backbone, converted, "backbone_checkpoint", Path("x")) == len(own)
    assert set(converted) == set(own)
    assert all(torch.equal(model.backbone.state_dict()[k], state[k]) for k in own)
    assert set(state) - set(converted) == UP_RENAMED_STEM | {"conv1.1.num_batches_tracked",
                                                            "conv1.4.num_batches_tracked", "fc.weight", "fc.bias"}
    # the stem keeps its initialisation, as in UP; a DDP-saved file ("module." prefixes) converts the same
    assert all(torch.equal(stem_before[k], v) for k, v in model.stem.state_dict().items())
    assert model.convert_backbone_state({f"module.{k}": v for k, v in state.items()}).keys() == converted.keys()


@pytest.fixture(scope="module")
def r50() -> DeepLabV3:
    torch.manual_seed(0)
    return DeepLabV3("resnet50", 19)


@pytest.mark.parametrize("depth", sorted(UP_PARAMS))
def test_parameter_count_matches_up(depth):
    model = DeepLabV3(depth, 19) if depth != "resnet50" else DeepLabV3("seg_resnet50", 19)  # UP's name works too
    assert abs(count_parameters(model) - UP_PARAMS[depth]) / UP_PARAMS[depth] < 0.005


def test_structure(r50):
    """UP deeplabv3_r50.yaml: OS8, stage 3 dilation 1,2,2..; multi-grid stage 4 dilations 4, 8, 16 (2x(2), 4x(2, 4));
    ASPP 5x256 at 1/8; aux head on stage 3 (1024 ch); both training outputs at the input size."""
    layer3 = [b.conv2.dilation[0] for b in r50.backbone.layer3]
    assert layer3 == [1, 2, 2, 2, 2, 2]
    assert [b.conv2.dilation[0] for b in r50.backbone.layer4] == [4, 8, 16]
    assert [b.conv2.padding[0] for b in r50.backbone.layer4] == [4, 8, 16]
    assert r50.stem.pool.ceil_mode  # UP's stem max pool
    assert r50.backbone.layer4[0].bn3.weight.abs().sum() == 0  # zero_init_residual
    x = torch.randn(2, 3, 97, 193)
    shapes = {}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: shapes.__setitem__(n, tuple(o.shape)))
             for n, m in [("stem", r50.stem), ("aspp", r50.aspp), ("head", r50.head), ("aux", r50.aux_head)]]
    r50.train()
    with torch.no_grad():
        stages = [tuple(f.shape) for f in r50.backbone(r50.stem(x))]
        outputs = r50(x)
    for h in hooks:
        h.remove()
    assert shapes["stem"] == (2, 128, 25, 49)
    assert stages == [(2, 256, 25, 49), (2, 512, 13, 25), (2, 1024, 13, 25), (2, 2048, 13, 25)]
    assert shapes["aspp"] == (2, 1280, 13, 25) and shapes["head"] == (2, 19, 13, 25)
    assert shapes["aux"] == (2, 19, 13, 25)
    assert len(outputs) == 2 and all(o.shape == (2, 19, 97, 193) for o in outputs)
    r50.eval()


def test_eval_returns_main_logits_at_input_size(r50):
    assert_segmentation_outputs(r50, num_aux=1)  # UP deeplabv3 config: seg_ohem aux_weight 0.4, one aux output


@pytest.mark.parametrize("depth", ["resnet50", "resnet101"])
def test_up_pretrain_file_fills_the_backbone(depth, r50):
    model = r50 if depth == "resnet50" else DeepLabV3(depth, 19)
    check_pretrain_file_loads(model, depth)


