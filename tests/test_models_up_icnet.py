"""ICNet is United-Perception's (UP, commit c477a744): its size, every intermediate shape, its four
training outputs, its pretrain file's key layout, and that it learns."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from harness.models.common import count_parameters
from harness.models.icnet import ICNet
from harness.models.weights import load_matching
from tests.helpers import add_batchnorm, assert_segmentation_outputs

pytestmark = pytest.mark.usefixtures("one_thread")

UP_README_PARAMS = 30_710_000  # ../shared/reference/united-perception/README.md: "ICNet R50 | ... | 30.71M"
UP_MEASURED_PARAMS = 30_711_968  # UP's ICNetEncoder + ICnetDecoder(num_classes=19) at c477a744, sum(p.numel())
UP_AUX_WEIGHTS = [0.4, 0.4, 0.4]  # UP's seg_icnet loss: loss1 + 0.4 * loss2 + 0.4 * loss3 + 0.4 * loss4


@pytest.fixture(scope="module")
def model() -> ICNet:
    torch.manual_seed(0)
    return ICNet(19)


def up_resnet50_state(prefix: str = "", classifier: bool = True) -> dict[str, torch.Tensor]:
    """A deep-stem ResNet-50 state dict with the names and shapes of UP's `seg_resnet50`
    (up/tasks/seg/models/encoder/seg_resnet.py: conv1 = Sequential(conv3x3 3->64 s2, BN, ReLU, conv3x3 64->64,
    BN, ReLU, conv3x3 64->128), bn1(128), Bottleneck layers [3, 4, 6, 3] with `downsample.0/1` on each first
    block), plus an ImageNet classifier `fc` when asked. Values are distinct per tensor. With the prefix
    `backbone.backbone.` these are exactly the 330 ResNet names and shapes of UP's ICNet state dict (checked
    against UP's classes)."""
    shapes: dict[str, tuple[int, ...]] = {}

    shapes["conv1.0.weight"] = (64, 3, 3, 3)
    add_batchnorm(shapes, "conv1.1", 64)
    shapes["conv1.3.weight"] = (64, 64, 3, 3)
    add_batchnorm(shapes, "conv1.4", 64)
    shapes["conv1.6.weight"] = (128, 64, 3, 3)
    add_batchnorm(shapes, "bn1", 128)
    inplanes = 128
    for stage, (planes, blocks) in enumerate([(64, 3), (128, 4), (256, 6), (512, 3)], start=1):
        for block in range(blocks):
            name = f"layer{stage}.{block}"
            shapes[f"{name}.conv1.weight"] = (planes, inplanes, 1, 1)
            add_batchnorm(shapes, f"{name}.bn1", planes)
            shapes[f"{name}.conv2.weight"] = (planes, planes, 3, 3)
            add_batchnorm(shapes, f"{name}.bn2", planes)
            shapes[f"{name}.conv3.weight"] = (planes * 4, planes, 1, 1)
            add_batchnorm(shapes, f"{name}.bn3", planes * 4)
            if block == 0:
                shapes[f"{name}.downsample.0.weight"] = (planes * 4, inplanes, 1, 1)
                add_batchnorm(shapes, f"{name}.downsample.1", planes * 4)
            inplanes = planes * 4
    if classifier:
        shapes["fc.weight"], shapes["fc.bias"] = (1000, 2048), (1000,)
    state = {}
    for index, (name, shape) in enumerate(shapes.items()):
        if name.endswith("num_batches_tracked"):
            state[prefix + name] = torch.tensor(index)
        else:
            state[prefix + name] = torch.full(shape, float(index)) + 0.01 * torch.randn(shape)
    return state


def test_parameter_count_is_ups(model):
    """UP README: 30.71M; UP's own classes counted: 30,711,968."""
    count = count_parameters(model)
    assert abs(count - UP_README_PARAMS) / UP_README_PARAMS < 0.005
    assert count == UP_MEASURED_PARAMS


def test_structure_and_training_outputs(model):
    """UP's icnet.py encoder/decoder: shapes at every step for a 97x193 image (bilinear halvings floor,
    the stem's max-pool uses ceil_mode, the pyramid pooling's 1x1 fuse has padding 1); training returns
    main + the 1/4, 1/8 and 1/16 outputs, each resized to the label size as UP's seg_icnet loss does."""
    x = torch.randn(2, 3, 97, 193)
    model.train()
    with torch.no_grad():
        maps = model.cascade(x)
        outputs = model(x)
    shapes = {name: tuple(t.shape) for name, t in maps.items()}
    assert shapes == {
        "sub1": (2, 64, 13, 25),  # three 3x3 stride-2 convs: 1/8
        "stem": (2, 128, 13, 25),  # image x0.5 (48x96), stem stride 2 (24x48), max-pool with ceil_mode (13x25)
        "stage1": (2, 256, 13, 25),
        "stage2": (2, 512, 7, 13),
        "stage3": (2, 1024, 3, 6),  # stage 2 x0.5 (floor), then dilated stages: no further stride
        "stage4": (2, 2048, 3, 6),
        "pyramid": (2, 512, 5, 8),  # UP's 1x1 fuse conv pads by 1
        "fused_24": (2, 128, 7, 13), "low_24": (2, 128, 7, 13),  # at sub2's size
        "fused_12": (2, 128, 13, 25), "low_12": (2, 128, 13, 25),  # at sub1's size
        "logits_4": (2, 19, 26, 50),
    }
    assert isinstance(outputs, tuple) and len(outputs) == 1 + len(UP_AUX_WEIGHTS)
    assert all(out.shape == (2, 19, 97, 193) for out in outputs)
    # Dilation 2 and 4 on stages 3-4 (first block of each at the previous dilation), stride 1.
    stage3, stage4 = model.backbone.layer3, model.backbone.layer4
    assert [b.conv2.dilation[0] for b in stage3] == [1] + [2] * 5 and [b.conv2.dilation[0] for b in stage4] == [2, 4, 4]
    assert stage3[0].conv2.stride == (1, 1) and stage4[0].downsample[0].stride == (1, 1)
    # UP's config: zero_init_residual: True.
    assert all(torch.all(block.bn3.weight == 0) for layer in (model.backbone.layer1, stage4) for block in layer)


def test_eval_returns_main_logits_at_input_size(model):
    """Contract: eval -> main logits only at the input's (odd) size; train -> main + 3 auxiliary outputs."""
    assert_segmentation_outputs(model, num_aux=len(UP_AUX_WEIGHTS))


@pytest.mark.parametrize("prefix", ["backbone.backbone.", ""])
def test_ups_pretrain_file_fills_the_whole_backbone(prefix):
    """UP's icnet.yaml pretrain_model `icnet_r50_pretrain.pth`: UP's loader fills the encoder's ResNet only
    from whole-model names `backbone.backbone.<seg_resnet50 name>`; an unconverted deep-stem ImageNet file
    (plain names) is accepted too. Every backbone tensor is filled, every file tensor but `fc.*` used."""
    torch.manual_seed(0)
    model = ICNet(19)
    state = up_resnet50_state(prefix)
    converted = model.convert_backbone_state(state)
    own = model.backbone.state_dict()
    assert set(converted) == set(own)
    assert set(state) - {prefix + name for name in converted} == {prefix + "fc.weight", prefix + "fc.bias"}
    assert load_matching(model.backbone, converted, "backbone_checkpoint", Path("x")) == len(own)
    for name, tensor in model.backbone.state_dict().items():
        assert torch.equal(tensor, state[prefix + name]), name


