"""DFNet1/DFNet2 and DF-Seg v1/v2 as United-Perception builds them (up/tasks/seg/models/encoder/dfnet_encoder.py,
decoder/dfnet_decoder.py, components.py at commit c477a744): sizes, taps, UP's pyramid pooling, feature shapes,
outputs, the df1/df2 ImageNet file, DF-Seg's half-resolution option, learning. SFNet: tests/test_models_up_sfnet.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from harness.config.spec import load_all, load_spec
from harness.errors import BenchError
from harness.models import build_model
from harness.models.common import PyramidPooling, count_parameters
from harness.models.df_seg import DFSeg
from harness.models.dfnet import convert_imagenet_state, dfnet
from harness.models.sizes import measure
from tests.helpers import assert_segmentation_outputs, experiments_with, per_image_shapes
from tests.test_models_up_sfnet import assert_pretrain_file_loads, up_pretrain_shapes

# UP's dfnetv1 / dfnetv2 encoders (no classifier) and DFSegDecoder(num_classes=19) on them, counted from UP's code
# with its framework stubbed (sum(p.numel())); the DF-Seg figures are UP README's
# (../shared/reference/united-perception/README.md: "DF-Seg v1 / v2 ... | 9,370,931 / 18,825,011").
BACKBONE_PARAMS = {"dfnet1": 8_020_128, "dfnet2": 17_474_208}
DF_SEG_PARAMS = {"dfnet1": 9_370_931, "dfnet2": 18_825_011}

# Segmentation taps, (channels, reduction) shallowest first (UP dfnet_encoder.py `res['features'] = [x3, x4, x5]`:
# DFNet1 stage3/stage4/stage5, DFNet2 stage2_2/stage3_2/stage4_2).
TAPS = {
    "dfnet1": [(128, 16), (256, 32), (512, 32)],
    "dfnet2": [(128, 8), (256, 16), (512, 32)],
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models() -> dict[str, DFSeg]:
    torch.manual_seed(0)
    return {name: DFSeg(name, 19) for name in DF_SEG_PARAMS}


# --- sizes and taps --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(BACKBONE_PARAMS))
def test_dfnet_parameter_count_is_ups(name):
    assert count_parameters(dfnet(name)) == BACKBONE_PARAMS[name]


@pytest.mark.parametrize("name", sorted(DF_SEG_PARAMS))
def test_df_seg_parameter_count_is_ups(name, models):
    """UP README: 9,370,931 / 18,825,011."""
    assert count_parameters(models[name]) == DF_SEG_PARAMS[name]


def test_every_df_seg_parameter_runs_in_eval(models):
    """UP's DF-Seg decoder has no auxiliary head."""
    size = measure(models["dfnet1"], 64, 64)
    assert size.inference_params == size.params


@pytest.mark.parametrize("name", sorted(TAPS))
def test_taps_have_the_documented_strides_and_channels(name):
    backbone = dfnet(name).eval()
    channels = [c for c, _ in TAPS[name]]
    reductions = [r for _, r in TAPS[name]]
    assert backbone.feature_info.channels() == channels
    assert backbone.feature_info.reduction() == reductions
    with torch.no_grad():
        taps = backbone(torch.randn(1, 3, 64, 128))
    assert [tuple(t.shape) for t in taps] == [(1, c, 64 // r, 128 // r) for c, r in TAPS[name]]


@pytest.mark.parametrize("name", sorted(BACKBONE_PARAMS))
def test_dfnet_names_and_shapes_are_those_of_ups_encoder(name):
    """The names UP's encoder gives its tensors (and df1/df2_imagenet.pth carries), classifier aside."""
    own = {k: tuple(v.shape) for k, v in dfnet(name).state_dict().items()}
    assert own == up_pretrain_shapes(name, classifier=False)


def test_dfnet_refuses_other_backbones_and_strides():
    with pytest.raises(BenchError, match="not a DFNet"):
        dfnet("resnet18")
    with pytest.raises(BenchError, match="output stride 32 only"):
        dfnet("dfnet1", output_stride=8)


# --- UP's pyramid pooling --------------------------------------------------------------------------


def test_pyramid_pooling_is_ups_psp_module():
    """UP components.py PSPModule: branches pool, 1x1 conv, BN and NO ReLU; the 1x1 bottleneck has padding=1,
    so the output is 2 pixels larger, its border the BN-ReLU of zeros."""
    torch.manual_seed(0)
    ppm = PyramidPooling(16, 8)
    with torch.no_grad():
        for m in ppm.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_()
                m.bias.normal_()
    ppm.eval()
    branch_outputs = []
    hooks = [pool.register_forward_hook(lambda mod, args, out: branch_outputs.append(out)) for pool in ppm.pools]
    with torch.no_grad():
        out = ppm(torch.randn(2, 16, 5, 7))
    for h in hooks:
        h.remove()
    assert out.shape == (2, 8, 7, 9)
    assert min(o.min().item() for o in branch_outputs) < 0  # no ReLU after the branch BN
    bn = ppm.merge[1]
    border = F.relu(bn.bias - bn.running_mean * bn.weight / torch.sqrt(bn.running_var + bn.eps))
    assert torch.allclose(out[:, :, 0, :], border[None, :, None].expand(2, 8, 9), atol=1e-6)
    assert ppm.merge[0].in_channels == 16 + 4 * 8 and ppm.merge[0].padding == (1, 1)
    assert [p[0].output_size for p in ppm.pools] == [1, 2, 3, 6]


# --- structure and outputs ---------------------------------------------------------------------------

# UP dfnet_decoder.py for a 2x3x64x128 input, (C, H, W) per module output: PPM(x5) 2 pixels larger (padding 1),
# cc5 / cc4 / cc3 1x1 to 128, fn4 on x4's grid, fn3 on x3's grid, the 3x3-BN-ReLU-dropout-1x1 head there.
STRUCTURE = {
    "dfnet1": {
        "backbone": [(128, 4, 8), (256, 2, 4), (512, 2, 4)],
        "context": (128, 4, 6), "project_deep": (128, 4, 6),
        "project_middle": (128, 2, 4), "fuse_middle": (128, 2, 4),
        "project_shallow": (128, 4, 8), "fuse_shallow": (128, 4, 8), "head": (19, 4, 8),
    },
    "dfnet2": {
        "backbone": [(128, 8, 16), (256, 4, 8), (512, 2, 4)],
        "context": (128, 4, 6), "project_deep": (128, 4, 6),
        "project_middle": (128, 4, 8), "fuse_middle": (128, 4, 8),
        "project_shallow": (128, 8, 16), "fuse_shallow": (128, 8, 16), "head": (19, 8, 16),
    },
}


@pytest.mark.parametrize("name", sorted(STRUCTURE))
def test_feature_shapes_at_every_step_and_one_training_output(name, models):
    model = models[name]
    shapes, outputs = per_image_shapes(model, torch.randn(2, 3, 64, 128), STRUCTURE[name])
    assert shapes == STRUCTURE[name]
    # UP's decoder returns the main prediction only, upsampled to the input; seg_ohem aux_weight 0.
    assert isinstance(outputs, tuple) and len(outputs) == 1 and outputs[0].shape == (2, 19, 64, 128)


@pytest.mark.parametrize("name", sorted(DF_SEG_PARAMS))
def test_eval_main_logits_at_input_size_train_main_only(name, models):
    assert_segmentation_outputs(models[name], 0)


# --- the pretrain file ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(DF_SEG_PARAMS))
@pytest.mark.parametrize("prefix", ["", "module."])
def test_up_pretrain_file_fills_the_whole_backbone(name, prefix, models):
    """UP DF_seg_v1/v2.yaml saver.pretrain_model df1/df2_imagenet.pth, names as UP's encoder reads them."""
    assert_pretrain_file_loads(models[name], name, prefix)


def test_converter_keeps_unknown_names_for_the_loader_to_report():
    state = {"stage1.0.weight": torch.zeros(1), "fc.weight": torch.zeros(1), "module.extra": torch.zeros(1)}
    assert set(convert_imagenet_state(state)) == {"stage1.0.weight", "extra"}


# --- DF-Seg's half-resolution inference (lxtGH's trick, not UP's; off by default) ---------------------


def test_eval_half_resolution_is_off_by_default_and_for_every_df_seg_row():
    assert DFSeg("dfnet1", 19).eval_half_resolution is False
    rows = [spec for spec in load_all() if spec.model.family == "df_seg"]
    assert {"df_seg_v1", "df_seg_v2"} <= {spec.row for spec in rows}
    assert not any(spec.model.eval_half_resolution for spec in rows)


def test_eval_half_resolution_infers_at_half_size_and_returns_full_size():
    torch.manual_seed(0)
    half = DFSeg("dfnet1", 19, eval_half_resolution=True).eval()
    full = DFSeg("dfnet1", 19).eval()
    full.load_state_dict(half.state_dict())
    x = torch.randn(1, 3, 128, 256)
    with torch.no_grad():
        out_half, out_full = half(x), full(x)
        # What the option means: the logits of the half-size image, upsampled back to the input size.
        small = full.logits(F.interpolate(x, (64, 128), mode="bilinear", align_corners=True))
    assert out_half.shape == out_full.shape == (1, 19, 128, 256)
    assert not torch.allclose(out_half, out_full, atol=1e-3)
    assert torch.allclose(out_half, F.interpolate(small, (128, 256), mode="bilinear", align_corners=True), atol=1e-4)
    # Training is unaffected: the crop is seen at full size.
    (train_out,) = half.train()(x.repeat(2, 1, 1, 1))
    assert train_out.shape == (2, 19, 128, 256)


def test_sf_seg_rejects_eval_half_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv("SEGBENCH_EXPERIMENTS", str(experiments_with(tmp_path, {
        "sf-half": {"inherit": "sf_seg_v1", "model": {"eval_half_resolution": True}, "reference": {"miou": [1.0]}},
    })))
    with pytest.raises(BenchError, match="eval_half_resolution") as error:
        build_model(load_spec("sf-half"))
    assert "sf-half" in str(error.value) and "\n" not in str(error.value)


# --- learning ----------------------------------------------------------------------------------------


