"""PSPNet is United-Perception's network (up/tasks/seg/models/decoder/pspnet.py + components.PSPModule on
encoder/seg_resnet.py, configs/seg/pspnet/pspnet.yaml): parameter count, shapes (including the 1x1 bottleneck's
padding=1, which grows the map by a pixel on each side), training outputs, pretrain file layout, learning."""

from __future__ import annotations

import pytest
import torch

from harness.models.common import count_parameters
from harness.models.pspnet import PSPNet
from tests.helpers import assert_segmentation_outputs, traced_forward
from tests.test_models_up_deeplabv3 import check_pretrain_file_loads

pytestmark = pytest.mark.usefixtures("one_thread")

# UP README (../shared/reference/united-perception/README.md): "pspnet R50 | ... | 34.66M"; UP's own classes
# (seg_resnet50(multi_grid, zero_init_residual, dilation [F, T, T]) + dec_pspnet(2048, 19 classes)),
# counted: 34,663,398.
UP_PARAMS = 34_663_398


@pytest.fixture(scope="module")
def model() -> PSPNet:
    torch.manual_seed(0)
    return PSPNet("resnet50", 19)


def test_parameter_count_matches_up(model):
    assert abs(count_parameters(model) - UP_PARAMS) / UP_PARAMS < 0.005


def test_structure(model):
    """Stages at OS8 with multi-grid 4/8/16; pooled bins 1, 2, 3, 6 of 512; fuse 4096 -> 512 (padded, 13x25 -> 15x27);
    aux head on stage 3; both training outputs at the input size."""
    assert [b.conv2.dilation[0] for b in model.backbone.layer4] == [4, 8, 16]
    x = torch.randn(2, 3, 97, 193)
    taps = [("bin", model.ppm.pools[-1]), ("fuse", model.ppm.merge), ("head", model.head), ("aux", model.aux_head)]
    shapes, outputs = traced_forward(model, x, dict(taps))
    with torch.no_grad():
        stages = [tuple(f.shape) for f in model.backbone(model.stem(x))]
    assert stages == [(2, 256, 25, 49), (2, 512, 13, 25), (2, 1024, 13, 25), (2, 2048, 13, 25)]
    assert model.ppm.merge[0].in_channels == 2048 + 4 * 512
    assert shapes["bin"] == (2, 512, 6, 6) and shapes["fuse"] == (2, 512, 15, 27)
    assert shapes["head"] == (2, 19, 15, 27) and shapes["aux"] == (2, 19, 13, 25)
    assert len(outputs) == 2 and all(o.shape == (2, 19, 97, 193) for o in outputs)
    model.eval()


def test_eval_returns_main_logits_at_input_size(model):
    assert_segmentation_outputs(model, num_aux=1)  # UP pspnet config: seg_ohem aux_weight 0.4, one aux output


def test_up_pretrain_file_fills_the_backbone(model):
    check_pretrain_file_loads(model, "resnet50")  # UP pspnet.yaml: resnet50-ebb6acbb.pth


