"""BiSeNet is United-Perception's network (up/tasks/seg/models/decoder/biseg.py `bisegnet` on
encoder/seg_resnet.py seg_resnet18, configs/seg/BiSeNet/BiSeNet.yaml): parameter count (main and auxiliary),
shapes along the context and spatial paths, three training outputs, the resnet18-deep.pth layout, learning."""

from __future__ import annotations

import pytest
import torch

from harness.models.bisenet import BiSeNetV1
from harness.models.common import count_parameters
from tests.helpers import assert_segmentation_outputs, traced_forward
from tests.test_models_up_deeplabv3 import check_pretrain_file_loads

pytestmark = pytest.mark.usefixtures("one_thread")

# UP README (../shared/reference/united-perception/README.md): "BiSeNet R18 (deep pt) | ... | 13.70M + 0.54M auxiliary";
# UP's own classes (seg_resnet18(zero_init_residual) + BiSegNet(19 classes)), counted: 14,241,280 in all, of which
# conv_out16 + conv_out32 (training only) 542,912.
UP_PARAMS, UP_AUX_PARAMS = 14_241_280, 542_912


@pytest.fixture(scope="module")
def model() -> BiSeNetV1:
    torch.manual_seed(0)
    return BiSeNetV1("resnet18", 19, output_stride=32)


def test_parameter_count_matches_up(model):
    assert abs(count_parameters(model) - UP_PARAMS) / UP_PARAMS < 0.005
    aux = sum(count_parameters(m) for n, m in model.named_children() if n.startswith("aux"))
    assert abs(aux - UP_AUX_PARAMS) / UP_AUX_PARAMS < 0.005


def test_structure(model):
    """R18 deep stem at OS32 (no dilation); spatial path at 1/8; context16 at 1/16, context8 at 1/8; head and aux
    PixelShuffle x8 / x8 / x16; three training outputs at the input size."""
    assert all(m.dilation == (1, 1) for m in model.backbone.modules() if isinstance(m, torch.nn.Conv2d))
    assert model.backbone.layer1[0].downsample is not None  # 128 stem channels -> 64
    x = torch.randn(2, 3, 97, 193)
    taps = [("spatial", model.spatial), ("refine32", model.refine32), ("refine16", model.refine16), ("ffm", model.ffm),
            ("head", model.head), ("aux8", model.aux_head8), ("aux16", model.aux_head16)]
    shapes, outputs = traced_forward(model, x, dict(taps))
    with torch.no_grad():
        stages = [tuple(f.shape) for f in model.backbone(model.stem(x))]
    assert stages == [(2, 64, 25, 49), (2, 128, 13, 25), (2, 256, 7, 13), (2, 512, 4, 7)]
    assert shapes["spatial"] == (2, 128, 13, 25)
    assert shapes["refine32"] == (2, 128, 7, 13)  # context16
    assert shapes["refine16"] == (2, 128, 14, 26)  # nearest x2, then resized to the spatial path's 13x25
    assert shapes["ffm"] == (2, 256, 13, 25) and shapes["head"] == (2, 19, 104, 200)
    assert shapes["aux8"] == (2, 19, 104, 200) and shapes["aux16"] == (2, 19, 112, 208)
    assert len(outputs) == 3 and all(o.shape == (2, 19, 97, 193) for o in outputs)
    model.eval()


def test_eval_returns_main_logits_at_input_size(model):
    assert_segmentation_outputs(model, num_aux=2)  # UP seg_bisegnet loss: main + 2 aux, OHEM each, weight 1


def test_up_pretrain_file_fills_the_backbone(model):
    check_pretrain_file_loads(model, "resnet18")  # UP BiSeNet.yaml: resnet18-deep.pth


