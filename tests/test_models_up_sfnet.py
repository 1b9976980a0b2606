"""SFNet v1 / v2 as United-Perception builds it (up/tasks/seg/models/decoder/sfnet.py, inner_planes 128, on
up/tasks/seg/models/encoder/dfnet_encoder.py): size, structure, outputs, UP's flow warp, the df1/df2 ImageNet
file, learning. Also the helpers test_models_dfnet.py shares: UP's pretrain-file layout and a short SGD run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from harness.models.common import count_parameters
from harness.models.sf_seg import SFNet, flow_warp
from harness.models.sizes import measure
from harness.models.weights import load_matching
from tests.helpers import add_batchnorm, assert_segmentation_outputs, per_image_shapes

pytestmark = pytest.mark.usefixtures("one_thread")

# UP README (../shared/reference/united-perception/README.md): "SFNet v1 / v2 ... inner_planes 128 | 8.59M / 18.04M".
# Exact figures: UP's dfnetv1/v2 + SFSegDecoder(num_classes=19, inner_planes=128), built from UP's code
# (commit c477a744) with its framework stubbed, sum(p.numel()).
UP_PARAMS = {"dfnet1": 8_587_059, "dfnet2": 18_041_139}
UP_README = {"dfnet1": 8_590_000, "dfnet2": 18_040_000}

# UP dfnet_encoder.py, `_make_layer(planes, blocks, stride)` calls in order, for the names of df1/df2_imagenet.pth.
UP_DFNET_STAGES = {
    "dfnet1": [("stage2", 64, 3, 2), ("stage3", 128, 3, 2), ("stage4", 256, 3, 2), ("stage5", 512, 1, 1)],
    "dfnet2": [("stage2_1", 64, 2, 2), ("stage2_2", 128, 1, 1), ("stage3_1", 128, 10, 2), ("stage3_2", 256, 1, 1),
               ("stage4_1", 256, 4, 2), ("stage4_2", 512, 2, 1)],
}


def up_pretrain_shapes(name: str, classifier: bool = True) -> dict[str, tuple[int, ...]]:
    """Every tensor name and shape of df1/df2_imagenet.pth as UP's encoder reads it (dfnet_encoder.py:
    `stage1` = conv(3->32)/BN/ReLU/conv(32->64)/BN/ReLU, then BasicBlocks conv1/bn1/conv2/bn2/downsample),
    plus the ImageNet classifier `fc` (512 -> 1000) of the published DFNet, which UP's encoder lacks."""
    shapes: dict[str, tuple[int, ...]] = {}

    shapes["stage1.0.weight"] = (32, 3, 3, 3)
    add_batchnorm(shapes, "stage1.1", 32)
    shapes["stage1.3.weight"] = (64, 32, 3, 3)
    add_batchnorm(shapes, "stage1.4", 64)
    inplanes = 64
    for stage, planes, blocks, stride in UP_DFNET_STAGES[name]:
        for b in range(blocks):
            p = f"{stage}.{b}"
            shapes[f"{p}.conv1.weight"] = (planes, inplanes, 3, 3)
            add_batchnorm(shapes, f"{p}.bn1", planes)
            shapes[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
            add_batchnorm(shapes, f"{p}.bn2", planes)
            if b == 0 and (stride != 1 or inplanes != planes):
                shapes[f"{p}.downsample.0.weight"] = (planes, inplanes, 1, 1)
                add_batchnorm(shapes, f"{p}.downsample.1", planes)
            inplanes = planes
    if classifier:
        shapes["fc.weight"] = (1000, 512)
        shapes["fc.bias"] = (1000,)
    return shapes


def up_pretrain_state(name: str, prefix: str = "") -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {prefix + k: (torch.tensor(7) if s == () else torch.randn(s, generator=g))
            for k, s in up_pretrain_shapes(name).items()}


def assert_pretrain_file_loads(model: torch.nn.Module, name: str, prefix: str = "") -> None:
    """Every backbone tensor is filled from the file and every file tensor but the classifier is used."""
    state = up_pretrain_state(name, prefix)
    converted = model.convert_backbone_state(state)
    own = model.backbone.state_dict()
    assert set(converted) == set(own)
    assert not any(k.startswith("fc.") for k in converted)
    assert len(converted) == len(state) - 2  # only fc.weight and fc.bias dropped
    assert load_matching(model.backbone, converted, "backbone_checkpoint", Path("x")) == len(own)
    loaded = model.backbone.state_dict()
    for k, v in state.items():
        k = k[len(prefix):]
        if not k.startswith("fc."):
            assert torch.equal(loaded[k], v), k


@pytest.fixture(scope="module")
def models() -> dict[str, SFNet]:
    torch.manual_seed(0)
    return {name: SFNet(name, 19) for name in UP_PARAMS}


# --- (1) size -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(UP_PARAMS))
def test_parameter_count_is_ups(name, models):
    """UP's own count exactly; UP README 8.59M / 18.04M within 0.5 %."""
    count = count_parameters(models[name])
    assert count == UP_PARAMS[name]
    assert abs(count - UP_README[name]) / UP_README[name] < 0.005


def test_every_parameter_runs_in_eval(models):
    """UP's SFNet decoder has no deep-supervision heads: nothing is training-only."""
    size = measure(models["dfnet1"], 64, 64)
    assert size.inference_params == size.params
    assert not [n for n, _ in models["dfnet1"].named_modules() if n.startswith(("aux", "deep_supervision"))]


# --- (2) structure -------------------------------------------------------------------------------------

# UP sfnet.py for a 2x3x64x128 input, (C, H, W) per module output. DFNet1 taps 1/16, 1/32, 1/32; DFNet2 1/8,
# 1/16, 1/32. PSPModule's 1x1 bottleneck has padding=1, so the context is 2 pixels taller and wider than x5.
# FAM and the per-level 1x1 conv-BN-ReLU keep the lateral's grid; the fuse sees 3 x 128 channels at the finest.
STRUCTURE = {
    "dfnet1": {
        "backbone": [(128, 4, 8), (256, 2, 4), (512, 2, 4)],
        "context": (128, 4, 6),
        "laterals.1": (128, 2, 4), "align.1": (128, 2, 4), "smooth.1": (128, 2, 4),
        "laterals.0": (128, 4, 8), "align.0": (128, 4, 8), "smooth.0": (128, 4, 8),
        "fuse.0": (128, 4, 8), "classifier": (19, 4, 8),
    },
    "dfnet2": {
        "backbone": [(128, 8, 16), (256, 4, 8), (512, 2, 4)],
        "context": (128, 4, 6),
        "laterals.1": (128, 4, 8), "align.1": (128, 4, 8), "smooth.1": (128, 4, 8),
        "laterals.0": (128, 8, 16), "align.0": (128, 8, 16), "smooth.0": (128, 8, 16),
        "fuse.0": (128, 8, 16), "classifier": (19, 8, 16),
    },
}


@pytest.mark.parametrize("name", sorted(STRUCTURE))
def test_feature_shapes_at_every_step_and_one_training_output(name, models):
    model = models[name]
    shapes, outputs = per_image_shapes(model, torch.randn(2, 3, 64, 128), STRUCTURE[name])
    assert shapes == STRUCTURE[name]
    assert model.fuse[0].in_channels == 3 * 128
    # UP's decoder returns only the main prediction, upsampled to the input; its loss has aux_weight 0.
    assert isinstance(outputs, tuple) and len(outputs) == 1 and outputs[0].shape == (2, 19, 64, 128)


# --- (3) outputs ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(UP_PARAMS))
def test_eval_main_logits_at_odd_input_size(name, models):
    """Eval: main logits at 97x193; train: the main output only (UP sfnet_decoder, seg_ohem aux_weight 0)."""
    assert_segmentation_outputs(models[name], 0)


# --- UP's flow warp ------------------------------------------------------------------------------------


def sampling_matrix(positions: torch.Tensor, n: int) -> torch.Tensor:
    """Linear interpolation at pixel `positions` of a length-n signal, zeros outside."""
    m = torch.zeros(len(positions), n)
    for i, p in enumerate(positions.tolist()):
        lo = int(torch.floor(torch.tensor(p)))
        for j, w in ((lo, 1 - (p - lo)), (lo + 1, p - lo)):
            if 0 <= j < n:
                m[i, j] += w
    return m


def up_grid_reference(feature: torch.Tensor, dx: float, dy: float, size: tuple[int, int]) -> torch.Tensor:
    """UP AlignedModule.flow_warp by hand: grid linspace(-1, 1) over the output + flow / (out_w, out_h), read by
    grid_sample's default align_corners=False: pixel coordinate = ((g + 1) * n_in - 1) / 2."""
    (h_in, w_in), (h_out, w_out) = feature.shape[-2:], size
    gx = torch.linspace(-1, 1, w_out, dtype=torch.float64) + dx / w_out
    gy = torch.linspace(-1, 1, h_out, dtype=torch.float64) + dy / h_out
    ax = sampling_matrix(((gx + 1) * w_in - 1) / 2, w_in)
    ay = sampling_matrix(((gy + 1) * h_in - 1) / 2, h_in)
    return ay @ feature @ ax.T


@pytest.mark.parametrize("dx, dy", [(0.0, 0.0), (1.0, 0.0), (0.0, -1.5), (2.5, 0.75)])
def test_flow_warp_is_ups_grid_and_normalisation(dx, dy):
    torch.manual_seed(0)
    feature = torch.randn(1, 2, 5, 7)
    size = (9, 13)
    flow = torch.zeros(1, 2, *size)
    flow[:, 0], flow[:, 1] = dx, dy  # channel 0 is x (width), channel 1 is y (height)
    assert torch.allclose(flow_warp(feature, flow, size), up_grid_reference(feature, dx, dy, size), atol=1e-5)


def test_zero_flow_is_not_aligned_corners_upsampling():
    """UP calls grid_sample without align_corners: the outermost output points sit on the input's outer pixel
    edges, so each corner reads a quarter of the corner pixel (three quarters zero padding)."""
    feature = torch.randn(1, 3, 5, 7)
    out = flow_warp(feature, torch.zeros(1, 2, 9, 13), (9, 13))
    assert torch.allclose(out[..., 0, 0], 0.25 * feature[..., 0, 0], atol=1e-6)
    assert torch.allclose(out[..., -1, -1], 0.25 * feature[..., -1, -1], atol=1e-6)
    assert not torch.allclose(out, F.interpolate(feature, (9, 13), mode="bilinear", align_corners=True), atol=1e-3)


def test_fam_warps_the_unreduced_coarse_feature_with_its_predicted_flow(models):
    fam = models["dfnet1"].align[0]
    fine, coarse = torch.randn(1, 128, 6, 10), torch.randn(1, 128, 3, 5)
    with torch.no_grad():
        flow = fam.flow(fine, coarse)
        assert flow.shape == (1, 2, 6, 10)
        assert torch.allclose(fam(fine, coarse), flow_warp(coarse, flow, (6, 10)))


# --- (4) the pretrain file ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(UP_PARAMS))
@pytest.mark.parametrize("prefix", ["", "module."])
def test_up_pretrain_file_fills_the_whole_backbone(name, prefix, models):
    """UP SF_seg_v1/v2.yaml saver.pretrain_model df1/df2_imagenet.pth, names as UP's encoder reads them."""
    assert_pretrain_file_loads(models[name], name, prefix)


# --- (5) learning ---------------------------------------------------------------------------------------


