"""OHEM cross entropy keeps exactly the pixels lxtGH's OhemCrossEntropy2dTensor keeps, on a hand-built example."""

from __future__ import annotations

import math

import pytest
import torch

from harness.losses import SegmentationLoss, ohem_keep_mask
from harness.spec import LossSpec, load_spec
from tests.helpers import experiments_with

# True-class probabilities of ten valid pixels, and three ignored pixels. The ignored ones look like
# the hardest of all (the probability of class 1, their clamped target, is ~1e-9): were they counted,
# they would move the min_kept-th smallest probability, or be kept themselves.
VALID = [0.05, 0.2, 0.4, 0.6, 0.69, 0.71, 0.85, 0.9, 0.99, 0.999]
IGNORED = 3


def example() -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (1, 2, 1, 13) and targets (1, 1, 13): valid pixels are class 0 with softmax probability p."""
    p = torch.tensor(VALID, dtype=torch.float64)
    valid_logits = torch.stack([p.log(), (1 - p).log()])
    ignored_logits = torch.tensor([[10.0], [-10.0]], dtype=torch.float64).expand(2, IGNORED)
    logits = torch.cat([valid_logits, ignored_logits], dim=1).reshape(1, 2, 1, len(VALID) + IGNORED)
    target = torch.tensor([0] * len(VALID) + [255] * IGNORED).reshape(1, 1, -1)
    return logits, target


def kept(min_kept: int, thresh: float = 0.7) -> list[float | str]:
    logits, target = example()
    mask = ohem_keep_mask(logits, target, thresh, min_kept).flatten().tolist()
    return [VALID[i] if i < len(VALID) else "ignored" for i, keep in enumerate(mask) if keep]


def test_hard_pixels_kept_easy_ones_dropped():
    # min_kept is already met by the pixels at or under 0.7: exactly those are kept.
    assert kept(min_kept=2) == [0.05, 0.2, 0.4, 0.6, 0.69]
    assert kept(min_kept=0) == [0.05, 0.2, 0.4, 0.6, 0.69]


def test_at_least_min_kept_are_kept():
    # Fewer than 7 pixels are under 0.7: the threshold rises to the 7th smallest probability, 0.85.
    assert kept(min_kept=7) == [0.05, 0.2, 0.4, 0.6, 0.69, 0.71, 0.85]
    assert kept(min_kept=6) == [0.05, 0.2, 0.4, 0.6, 0.69, 0.71]


def test_min_kept_over_the_valid_count_keeps_every_valid_pixel():
    assert kept(min_kept=10) == VALID
    assert kept(min_kept=100_000) == VALID


def test_all_ignored_keeps_nothing():
    logits, target = example()
    assert not ohem_keep_mask(logits, torch.full_like(target, 255), 0.7, 2).any()


def test_loss_is_the_mean_cross_entropy_of_the_kept_pixels():
    logits, target = example()
    loss = SegmentationLoss(LossSpec(name="ohem", ohem_thresh=0.7, ohem_min_kept=7))(logits, target)
    expected = sum(-math.log(p) for p in VALID[:7]) / 7
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_defaults_and_the_fast_rows_recipe():
    assert (LossSpec().ohem_thresh, LossSpec().ohem_min_kept) == (0.7, 100_000)
    for row in ("bisenet-r18", "icnet-r50"):
        loss = load_spec(row).loss
        assert (loss.name, loss.ohem_thresh, loss.ohem_min_kept) == ("ohem", 0.7, 100_000)


def test_any_row_can_train_with_ohem(tmp_path, monkeypatch):
    root = experiments_with(tmp_path, {"pspnet-r50-ohem": {
        "inherit": "pspnet-r50", "loss": {"name": "ohem", "ohem_min_kept": 50}, "reference": {"miou": [0.0]}}})
    monkeypatch.setenv("SEGBENCH_EXPERIMENTS", str(root))
    spec = load_spec("pspnet-r50-ohem")
    assert spec.loss.name == "ohem" and spec.loss.aux_weights == [0.4] and spec.loss.ohem_min_kept == 50
    torch.manual_seed(0)
    target = torch.randint(0, 19, (2, 16, 16))
    main = torch.randn(2, 19, 16, 16)
    main[0] += 20 * torch.nn.functional.one_hot(target[0], 19).permute(2, 0, 1)  # image 0: every pixel easy
    main.requires_grad_(True)
    aux = torch.randn(2, 19, 4, 4, requires_grad=True)
    SegmentationLoss(spec.loss)((main, aux), target).backward()
    # The main output trains on the hard image only (256 pixels, over min_kept); the aux head also learns.
    touched = main.grad.abs().sum(1) > 0
    assert touched[0].sum() == 0 and touched[1].sum() == 16 * 16
    assert aux.grad.abs().sum() > 0


def test_min_kept_counts_per_group_of_images_as_ups_per_gpu_loss():
    """UP ran OHEM on each GPU's images: with group_images 1, each image keeps its own min_kept hardest
    pixels and the loss is the mean of the per-image means, taken over strided groups (images k, k + G, ...)."""
    torch.manual_seed(0)
    logits = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    target = torch.randint(0, 3, (4, 8, 8))
    spec = LossSpec(name="ohem", ohem_thresh=0.0, ohem_min_kept=10)
    per_image = [SegmentationLoss(spec)(logits[i:i + 1], target[i:i + 1]) for i in range(4)]
    grouped = SegmentationLoss(spec, group_images=1)(logits, target)
    assert grouped == pytest.approx(float(sum(per_image) / 4), rel=1e-12)
    pairs = SegmentationLoss(spec, group_images=2)(logits, target)
    strided = [SegmentationLoss(spec)(logits[k::2], target[k::2]) for k in range(2)]
    assert pairs == pytest.approx(float(sum(strided) / 2), rel=1e-12)
    whole = SegmentationLoss(spec)(logits, target)  # one group: 10 pixels kept in all, not 10 per image
    assert whole != pytest.approx(float(grouped), rel=1e-3)


def test_a_nan_probability_stays_in_the_loss_so_divergence_is_seen():
    logits, target = example()
    logits = logits.clone()
    logits[0, :, 0, 0] = float("nan")
    assert not torch.isfinite(SegmentationLoss(LossSpec(name="ohem", ohem_thresh=0.7, ohem_min_kept=3))(logits, target))
