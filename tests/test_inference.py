"""Test modes: sliding window, flip and multi-scale against hand-computed logits on tiny models."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from harness.config.precision import autocast_dtype, resolve_precision
from harness.config.spec import load_spec
from harness.data.augment import EvalTransform
from harness.data.cityscapes import find_samples
from harness.data.loaders import eval_loader
from harness.engine.evaluate import WHOLE_IMAGE, TestMode, evaluate, infer_logits, window_starts
from harness.engine.metrics import SegMetrics
from harness.errors import BenchError
from harness.outputs.panels import panel_indices
from harness.outputs.predictions import evaluate_split
from tests.helpers import plan_at


class Position(nn.Module):
    """Logits: column and row index within the input it is given, and twice the first colour channel.

    Position within the crop differs from crop to crop, so overlapping windows average visibly."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        cols = torch.arange(w, dtype=x.dtype).expand(n, 1, h, w)
        rows = torch.arange(h, dtype=x.dtype).view(h, 1).expand(n, 1, h, w)
        return torch.cat([cols, rows, 2 * x[:, :1]], dim=1)


def same_metrics(a: SegMetrics, b: SegMetrics) -> bool:
    close = lambda x, y: (math.isnan(x) and math.isnan(y)) or abs(x - y) < 1e-9  # noqa: E731
    return close(a.miou, b.miou) and close(a.pixel_accuracy, b.pixel_accuracy) and all(map(close, a.iou, b.iou))


def conv_model(kernel: int = 3, symmetric: bool = False, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 8, kernel, padding=kernel // 2), nn.ReLU(), nn.Conv2d(8, 5, kernel, padding=kernel // 2))
    if symmetric:  # kernels mirror-symmetric left to right: the model commutes with a horizontal flip
        with torch.no_grad():
            for conv in (model[0], model[2]):
                conv.weight.copy_(conv.weight + conv.weight.flip(-1))
    return model.eval()


def test_window_starts_cover_the_axis_and_end_flush():
    assert window_starts(10, 4, 3) == [0, 3, 6]
    assert window_starts(7, 4, 3) == [0, 3]
    assert window_starts(4, 4, 2) == [0]
    assert window_starts(3, 4, 2) == [0]
    assert window_starts(2048, 1024, 683) == [0, 683, 1024]


def test_crop_covering_the_image_equals_whole_image_inference():
    model = conv_model()
    image = torch.randn(1, 3, 12, 20)
    whole = infer_logits(model, image, (12, 20))
    exact = infer_logits(model, image, (12, 20), TestMode(crop_size=(20, 12)))
    torch.testing.assert_close(exact, whole, rtol=0, atol=1e-6)
    # A larger crop pads the image; a model that looks at one pixel at a time cannot see the padding.
    pointwise = conv_model(kernel=1)
    torch.testing.assert_close(infer_logits(pointwise, image, (12, 20), TestMode(crop_size=(32, 16))),
                               infer_logits(pointwise, image, (12, 20)), rtol=0, atol=1e-6)


def test_overlapping_windows_average_logits_as_computed_by_hand():
    image = torch.randn(1, 3, 7, 10)
    logits = infer_logits(Position(), image, (7, 10), TestMode(crop_size=(4, 4), crop_stride=(3, 3)))
    # Windows start at columns 0, 3, 6 and rows 0, 3 (4 wide, 4 tall): a pixel's value is its mean
    # position over the windows covering it.
    expected_cols = torch.tensor([0, 1, 2, 1.5, 1, 2, 1.5, 1, 2, 3])
    expected_rows = torch.tensor([0, 1, 2, 1.5, 1, 2, 3])
    torch.testing.assert_close(logits[0, 0], expected_cols.expand(7, 10))
    torch.testing.assert_close(logits[0, 1], expected_rows.view(7, 1).expand(7, 10))
    # Content-dependent logits land back on their own pixels.
    torch.testing.assert_close(logits[0, 2], 2 * image[0, 0])


def test_image_smaller_than_the_crop_is_padded_and_cut_back():
    image = torch.randn(2, 3, 3, 5)
    logits = infer_logits(Position(), image, (3, 5), TestMode(crop_size=(8, 6)))
    assert logits.shape == (2, 3, 3, 5)
    torch.testing.assert_close(logits[:, 0], torch.arange(5.0).expand(2, 3, 5))
    torch.testing.assert_close(logits[:, 2], 2 * image[:, 0])


def test_default_stride_is_two_thirds_of_the_crop():
    assert TestMode(crop_size=(1024, 1024)).stride == (683, 683)
    assert TestMode(crop_size=(769, 769), crop_stride=(513, 513)).stride == (513, 513)


def test_flip_of_a_flip_equivariant_model_returns_the_same_logits():
    model = conv_model(symmetric=True)
    image = torch.randn(1, 3, 16, 24)
    plain = infer_logits(model, image, (16, 24))
    assert torch.allclose(model(image.flip(-1)).flip(-1), plain, atol=1e-5)  # the model really is equivariant
    torch.testing.assert_close(infer_logits(model, image, (16, 24), TestMode(flip=True)), plain, rtol=0, atol=1e-5)


def test_flip_averages_the_mirrored_view_of_any_model():
    model = conv_model(seed=3)
    image = torch.randn(1, 3, 16, 24)
    plain = model(image)
    by_hand = (plain + model(image.flip(-1)).flip(-1)) / 2
    flipped = infer_logits(model, image, (16, 24), TestMode(flip=True))
    torch.testing.assert_close(flipped, by_hand)
    assert not torch.allclose(flipped, plain, atol=1e-3)


def test_multi_scale_averages_views_resized_to_the_ground_truth():
    model = conv_model(seed=1)
    image = torch.randn(1, 3, 16, 24)
    out = (32, 48)  # ground truth twice the test size
    up = lambda t: F.interpolate(t, size=out, mode="bilinear", align_corners=False)  # noqa: E731
    half = F.interpolate(image, size=(8, 12), mode="bilinear", align_corners=False)
    by_hand = (up(model(half)) + up(model(image))) / 2
    torch.testing.assert_close(infer_logits(model, image, out, TestMode(scales=(0.5, 1.0))), by_hand)
    torch.testing.assert_close(infer_logits(model, image, out, TestMode(scales=(1.0,))), up(model(image)))


def test_flip_scales_and_windows_combine():
    image = torch.randn(1, 3, 8, 12)
    mode = TestMode(crop_size=(6, 6), crop_stride=(4, 4), flip=True, scales=(1.0, 1.5))
    logits = infer_logits(Position(), image, (8, 12), mode)
    assert logits.shape == (1, 3, 8, 12) and mode.views == 4
    assert mode.describe() == "slide 6x6/4x4 +flip scales 1,1.5"
    assert WHOLE_IMAGE.describe() == "whole"


def test_mode_from_the_plan_defaults_to_whole_image_and_scales_the_crop_for_small_test_sizes():
    spec = load_spec("deeplabv3-r50")
    assert TestMode.from_plan(plan_at(spec)) == WHOLE_IMAGE
    spec.columns.crop_test = [1024, 1024]
    assert TestMode.from_plan(plan_at(spec)).crop_size == (1024, 1024)
    small = TestMode.from_plan(plan_at(spec, test_size=[256, 256]))  # an eighth of 2048 wide, a quarter of 1024 tall
    assert small.crop_size == (128, 256) and small.stride == (86, 171)
    spec.eval.crop_stride, spec.eval.flip, spec.eval.scales = [512, 512], True, [0.75, 1.0]
    assert TestMode.from_plan(plan_at(spec)) == TestMode((1024, 1024), (512, 512), True, (0.75, 1.0))
    # The synthetic plan evaluates at the synthetic test size, with the crop shrunk alike.
    assert TestMode.from_plan(plan_at(spec, dataset="synthetic")).crop_size == (128, 128)


@pytest.mark.parametrize("change, words", [
    ({"crop_test": None, "crop_stride": [512, 512]}, "columns.crop_test is null"),
    ({"crop_test": [512, 512], "crop_stride": [600, 512]}, "larger than columns.crop_test"),
    ({"crop_test": [512, 0]}, "two positive integers"),
    ({"scales": []}, "positive numbers"),
    ({"scales": [1.0, 0.0]}, "positive numbers"),
])
def test_bad_eval_settings_are_one_line_errors_naming_the_row(change: dict, words: str):
    spec = load_spec("deeplabv3-r50")
    spec.columns.crop_test = change.get("crop_test")
    spec.eval.crop_stride = change.get("crop_stride")
    spec.eval.scales = change.get("scales", [1.0])
    with pytest.raises(BenchError) as err:
        TestMode.from_plan(plan_at(spec))
    assert words in str(err.value) and "deeplabv3-r50" in str(err.value) and "\n" not in str(err.value)


def test_precision_defaults_by_device_any_precision_by_request_and_checked():
    assert autocast_dtype("fp32") is None and autocast_dtype("fp16") is torch.float16
    assert resolve_precision(None, "cpu") == "fp32" and resolve_precision(None, "cuda") == "bf16"
    assert resolve_precision("bf16", "cpu") == "bf16" and resolve_precision("fp32", "cuda") == "fp32"
    with pytest.raises(BenchError, match="--precision fp8: use one of fp32, bf16, fp16"):
        resolve_precision("fp8", "cpu")
    with pytest.raises(BenchError, match="precision 'fp8'"):
        autocast_dtype("fp8")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a GPU"))])
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_stays_close_to_fp32(precision: str, device: str):
    model = conv_model().to(device)
    image = torch.randn(1, 3, 64, 128, device=device)
    mode = TestMode(crop_size=(64, 64), flip=True)
    reference = infer_logits(model, image, (64, 128), mode)
    reduced = infer_logits(model, image, (64, 128), mode, precision)
    assert reduced.dtype == torch.float32 and not torch.equal(reduced, reference)  # autocast really ran
    torch.testing.assert_close(reduced, reference, rtol=0.05, atol=0.05)


def test_panel_indices_spread_over_the_split():
    assert panel_indices(500, 4) == [0, 166, 333, 499]
    assert panel_indices(3, 4) == [0, 1, 2]
    assert panel_indices(10, 0) == [] and panel_indices(10, 1) == [0]


def test_one_pass_scores_several_models_as_each_alone_and_keeps_their_mode(synthetic_root: Path):
    spec = load_spec("deeplabv3-r50")
    samples = find_samples(synthetic_root, "val")[:3]
    # Logits of random convs on normalised colours: several classes predicted, several missed.
    heads = [nn.Sequential(conv_model(seed=seed), nn.Conv2d(5, 19, 1)) for seed in (2, 3)]
    heads[0].train()
    heads[1].eval()
    alone = [evaluate_split(h, samples, plan_at(spec, spec.synthetic.test_size), torch.device("cpu"), workers=0,
                            progress=False) for h in heads]
    assert heads[0].training and not heads[1].training
    transform = EvalTransform(tuple(spec.synthetic.test_size), tuple(spec.data.mean), tuple(spec.data.std))
    together = evaluate({"a": heads[0], "b": heads[1]}, eval_loader(samples, torch.device("cpu")), torch.device("cpu"),
                        transform, progress=False)
    assert heads[0].training and not heads[1].training
    assert same_metrics(together["a"], alone[0]) and same_metrics(together["b"], alone[1])
    assert not same_metrics(alone[0], alone[1])
    # A test size below the ground truth's: logits are scored at ground-truth size all the same.
    small = evaluate_split(heads[0], samples, plan_at(spec, [128, 64]), torch.device("cpu"), workers=0, progress=False)
    assert not same_metrics(small, alone[0]) and len(small.iou) == 19
