"""DeepLabV3 is torchvision's network: same parameter count, any input size, aux head only in training."""

import pytest
import torch

from harness.models import build_model
from harness.models.common import count_parameters
from harness.spec import load_spec

# torchvision.models.segmentation.deeplabv3_resnet50/101(num_classes=19, aux_loss=True), counted with
# sum(p.numel()); the same figures are in ../shared/reference/architectures.md.
TORCHVISION_PARAMS = {"deeplabv3-r50": 42_003_046, "deeplabv3-r101": 60_995_174}


@pytest.mark.parametrize("row", sorted(TORCHVISION_PARAMS))
def test_parameter_count_matches_torchvision(row):
    target = TORCHVISION_PARAMS[row]
    assert abs(count_parameters(build_model(load_spec(row))) - target) / target < 0.02


def test_deeplabv3_shapes_and_aux_head():
    torch.manual_seed(0)
    model = build_model(load_spec("deeplabv3-r50"))
    x = torch.randn(2, 3, 97, 193)
    model.train()
    main, aux = model(x)
    assert main.shape == (2, 19, 97, 193) and aux.shape[:2] == (2, 19)
    model.eval()
    with torch.no_grad():
        assert model(x[:1]).shape == (1, 19, 97, 193)
