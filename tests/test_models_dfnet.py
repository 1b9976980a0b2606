"""DFNet1/DFNet2, DF-Seg v1/v2 and SFNet v1/v2 are the published networks: their sizes, taps, output shapes,
training outputs, the flow alignment module, DF-Seg's half-resolution option, and that each one learns."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from harness.errors import BenchError
from harness.models import build_model
from harness.models.common import count_parameters
from harness.models.dfnet import dfnet
from harness.models.sf_seg import FlowAlignment, flow_warp
from harness.spec import load_all, load_spec
from tests.helpers import assert_segmentation_outputs, experiments_with, overfit_losses

# Parameter targets, 19 classes, training-only heads included
# (../shared/reference/architectures.md, "The families"; a build within 2 % is the same network).
BACKBONE_TARGETS = {
    "dfnet1": 8_020_000,  # "DFNet backbones | dfnet1, dfnet2 | ... | 8.02M / 17.47M (no classifier)"
    "dfnet2": 17_470_000,
}
ROW_TARGETS = {
    "df_seg_v1": 9_370_000,  # "DF-Seg | df_seg_v1, df_seg_v2 | ... | 9.37M / 18.83M"
    "df_seg_v2": 18_830_000,
    "sf_seg_v1": 8_500_000,  # "SFNet | sf_seg_v1, sf_seg_v2 | ... | 8.50M / 17.95M" (deep-supervision heads included)
    "sf_seg_v2": 17_950_000,
}
ROWS = sorted(ROW_TARGETS)

# Segmentation taps, (channels, reduction) shallowest first (architectures.md, "DFNet layer tables":
# "DFNet1 128 @1/16, 256 @1/32, 512 @1/32 ...; DFNet2 128 @1/8, 256 @1/16, 512 @1/32").
TAPS = {
    "dfnet1": [(128, 16), (256, 32), (512, 32)],
    "dfnet2": [(128, 8), (256, 16), (512, 32)],
}


pytestmark = pytest.mark.usefixtures("one_thread")


def close(count: int, target: int) -> bool:
    return abs(count - target) / target < 0.02


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    return {row: build_model(load_spec(row)) for row in ROWS}


# --- sizes and taps --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(BACKBONE_TARGETS))
def test_dfnet_parameter_count_matches_the_paper(name):
    count = count_parameters(dfnet(name))
    assert close(count, BACKBONE_TARGETS[name]), count


@pytest.mark.parametrize("row", ROWS)
def test_parameter_count_matches_the_published_network(row, models):
    count = count_parameters(models[row])
    assert close(count, ROW_TARGETS[row]), count


def test_dfnet2_is_not_dfnet1():
    """The two targets are far apart: the 2 % check could not pass with the wrong layer table."""
    assert not close(count_parameters(dfnet("dfnet1")), BACKBONE_TARGETS["dfnet2"])
    assert not close(count_parameters(dfnet("dfnet2")), BACKBONE_TARGETS["dfnet1"])


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


@pytest.mark.parametrize("row", ROWS)
def test_rows_use_their_dfnet(row, models):
    expected = "dfnet1" if row.endswith("v1") else "dfnet2"
    assert load_spec(row).model.backbone == expected
    assert models[row].backbone.feature_info.reduction() == [r for _, r in TAPS[expected]]


def test_dfnet_refuses_other_backbones_and_strides():
    with pytest.raises(BenchError, match="not a DFNet"):
        dfnet("resnet18")
    with pytest.raises(BenchError, match="output stride 32 only"):
        dfnet("dfnet1", output_stride=8)


# --- outputs ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("row", ROWS)
def test_eval_main_logits_at_input_size_train_main_and_aux(row, models):
    model = models[row]
    aux_weights = load_spec(row).loss.aux_weights
    assert len(aux_weights) == (0 if row.startswith("df_seg") else 2)
    assert_segmentation_outputs(model, len(aux_weights))


def test_sfnet_deep_supervision_heads_run_only_in_training(models):
    """The deep-supervision heads are counted in the parameters but an eval forward does not run them."""
    from harness.models.sizes import measure

    model = models["sf_seg_v1"]
    heads = sum(p.numel() for name, p in model.named_parameters() if name.startswith("deep_supervision"))
    assert heads > 0
    size = measure(model, 64, 64)
    assert size.inference_params == size.params - heads


# --- the flow alignment module ---------------------------------------------------------------------


def test_zero_flow_is_bilinear_upsampling_with_aligned_corners():
    coarse = torch.randn(2, 3, 5, 7)
    size = (13, 17)
    out = flow_warp(coarse, torch.zeros(2, 2, *size), size)
    expected = F.interpolate(coarse, size, mode="bilinear", align_corners=True)
    assert out.shape == expected.shape
    assert torch.allclose(out, expected, atol=1e-5)


def test_fam_with_zero_flow_weights_is_upsampling_and_with_learned_ones_is_not():
    torch.manual_seed(0)
    fam = FlowAlignment(8, 4)
    fine, coarse = torch.randn(1, 8, 13, 17), torch.randn(1, 8, 5, 7)
    expected = F.interpolate(coarse, (13, 17), mode="bilinear", align_corners=True)
    assert not torch.allclose(fam(fine, coarse), expected, atol=1e-3)  # a random flow conv does move things
    with torch.no_grad():
        fam.predict_flow.weight.zero_()
    assert torch.allclose(fam(fine, coarse), expected, atol=1e-5)


def constant_flow(dx: float, dy: float, height: int, width: int) -> torch.Tensor:
    flow = torch.zeros(1, 2, height, width)
    flow[:, 0], flow[:, 1] = dx, dy
    return flow


def test_one_pixel_flow_in_x_reads_the_next_column():
    feature = torch.randn(1, 3, 6, 9)
    out = flow_warp(feature, constant_flow(1.0, 0.0, 6, 9), (6, 9))
    assert torch.allclose(out[..., :, :-1], feature[..., :, 1:], atol=1e-5)
    assert torch.allclose(out[..., :, -1], torch.zeros(1, 3, 6), atol=1e-5)  # outside: padding_mode zeros
    back = flow_warp(feature, constant_flow(-1.0, 0.0, 6, 9), (6, 9))
    assert torch.allclose(back[..., :, 1:], feature[..., :, :-1], atol=1e-5)
    assert torch.allclose(back[..., :, 0], torch.zeros(1, 3, 6), atol=1e-5)


def test_one_pixel_flow_in_y_reads_the_next_row():
    """Channel 1 of the flow is the y (height) displacement."""
    feature = torch.randn(1, 3, 6, 9)
    out = flow_warp(feature, constant_flow(0.0, 1.0, 6, 9), (6, 9))
    assert torch.allclose(out[..., :-1, :], feature[..., 1:, :], atol=1e-5)
    assert torch.allclose(out[..., -1, :], torch.zeros(1, 3, 9), atol=1e-5)


def test_half_pixel_flow_averages_neighbours():
    feature = torch.randn(1, 3, 6, 9)
    out = flow_warp(feature, constant_flow(0.5, 0.0, 6, 9), (6, 9))
    assert torch.allclose(out[..., :, :-1], 0.5 * (feature[..., :, :-1] + feature[..., :, 1:]), atol=1e-5)
    assert torch.allclose(out[..., :, -1], 0.5 * feature[..., :, -1], atol=1e-5)  # half of it falls outside
    out = flow_warp(feature, constant_flow(0.0, 0.5, 6, 9), (6, 9))
    assert torch.allclose(out[..., :-1, :], 0.5 * (feature[..., :-1, :] + feature[..., 1:, :]), atol=1e-5)


def test_flow_is_in_pixels_of_the_output_grid():
    """Warping a coarse map with flow 2 equals upsampling it, then reading two output pixels to the right."""
    coarse = torch.randn(1, 2, 4, 5)
    size = (7, 13)
    up = F.interpolate(coarse, size, mode="bilinear", align_corners=True)
    out = flow_warp(coarse, constant_flow(2.0, 0.0, *size), size)
    assert torch.allclose(out[..., :, :-2], up[..., :, 2:], atol=1e-5)


# --- DF-Seg's half-resolution inference --------------------------------------------------------------


def test_eval_half_resolution_is_off_for_every_df_seg_row():
    rows = [spec for spec in load_all() if spec.model.family == "df_seg"]
    assert {"df_seg_v1", "df_seg_v2", "df_seg_v1-mseg"} <= {spec.row for spec in rows}
    assert not any(spec.model.eval_half_resolution for spec in rows)


def test_eval_half_resolution_infers_at_half_size_and_returns_full_size(tmp_path, monkeypatch):
    monkeypatch.setenv("SEGBENCH_EXPERIMENTS", str(experiments_with(tmp_path, {
        "df-half": {"inherit": "df_seg_v1", "model": {"eval_half_resolution": True}, "reference": {"miou": [1.0]}},
    })))
    torch.manual_seed(0)
    half = build_model(load_spec("df-half")).eval()
    full = build_model(load_spec("df_seg_v1")).eval()
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


@pytest.mark.slow
@pytest.mark.parametrize("row", ROWS)
def test_overfits_one_batch(row):
    """The row's loss (OHEM; SFNet's two deep-supervision terms at weight 1.0) halves in 20 SGD steps."""
    losses = overfit_losses(row)
    assert losses[-1] < 0.5 * losses[0], losses
