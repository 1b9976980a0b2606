"""OHEM cross entropy keeps exactly the pixels lxtGH's OhemCrossEntropy2dTensor keeps, on a hand-built example."""

from __future__ import annotations

import math

import pytest
import torch

from harness.config.spec import LossSpec, load_spec
from harness.engine.losses import SegmentationLoss, ohem_keep_mask
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


def test_the_shared_recipe_and_the_fast_rows_recipe():
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


# --- the fast OHEM against a straightforward reference ---------------------------------------------------------
#
# The reference is the rule as the project computed it before: softmax, the valid probabilities picked out by
# boolean indexing, kthvalue, the k-th value read back with .item(), Python's max(thresh, p_k), one strided
# group of images at a time, and F.cross_entropy over the kept pixels.


def reference_select(prob: torch.Tensor, valid: torch.Tensor, thresh: float, min_kept: int) -> torch.Tensor:
    num_valid = int(valid.sum())
    if num_valid == 0 or min_kept >= num_valid:
        return valid.clone()
    threshold = thresh
    if min_kept > 0:
        threshold = max(thresh, prob[valid].kthvalue(min_kept).values.item())
    return valid & ~(prob > threshold)


def reference_prob(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return logits.softmax(dim=1).gather(1, target.clamp(max=logits.shape[1] - 1).unsqueeze(1)).squeeze(1)


def reference_loss(outputs, target, spec: LossSpec, group_images: int = 0) -> torch.Tensor:
    outputs = (outputs,) if isinstance(outputs, torch.Tensor) else outputs
    total = 0.0
    for weight, logits in zip([1.0, *spec.aux_weights], outputs):
        logits = torch.nn.functional.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)
        groups = max(1, logits.shape[0] // group_images) if group_images else 1
        means = []
        for k in range(groups):
            group_logits, group_target = logits[k::groups].double(), target[k::groups]
            if spec.name == "ohem":
                keep = reference_select(reference_prob(group_logits.detach(), group_target), group_target != 255,
                                        spec.ohem_thresh, spec.ohem_min_kept)
                group_target = torch.where(keep, group_target, 255)
            summed = torch.nn.functional.cross_entropy(group_logits, group_target, ignore_index=255, reduction="sum")
            means.append(summed / (group_target != 255).sum().clamp(min=1))
        total = total + weight * torch.stack(means).mean()
    return total


def random_case(gen: torch.Generator, case: int) -> dict:
    """Probabilities with ties (quantised to a few levels, some exactly at thresh), ignored pixels, NaN, and
    min_kept from 0 to beyond the group's pixel count, so it binds in some groups and not in others."""
    n, h, w = [int(torch.randint(1, hi, (1,), generator=gen)) for hi in (6, 7, 9)]
    levels = [None, 10, 4][case % 3]
    prob = torch.rand(n, h, w, generator=gen, dtype=torch.float64)
    if levels:
        prob = (prob * levels).floor() / levels
    valid = torch.rand(n, h, w, generator=gen) > [0.0, 0.3, 0.9][case % 4 % 3]
    if case % 7 in (0, 1):  # NaN: sometimes so many that the min_kept-th smallest valid probability is NaN
        prob[torch.rand(n, h, w, generator=gen) < [0.1, 0.6][case % 7]] = float("nan")
    if case % 11 == 0:
        prob = prob.float()
    group_images = int(torch.randint(0, 4, (1,), generator=gen))
    groups = max(1, n // group_images) if group_images else 1
    per_group = -(-n // groups) * h * w
    min_kept = [0, 1, int(torch.randint(1, per_group + 1, (1,), generator=gen)), per_group, per_group + 5][case % 5]
    thresh = [0.7, 0.5, 0.0, 1.0][case % 4]
    return dict(prob=prob, valid=valid, thresh=thresh, min_kept=min_kept, groups=groups)


def test_fast_selection_keeps_exactly_the_reference_pixels_on_random_probabilities():
    from harness.engine.losses import ohem_select

    gen = torch.Generator().manual_seed(0)
    binding = loose = 0
    for case in range(400):
        c = random_case(gen, case)
        fast = ohem_select(c["prob"], c["valid"], c["thresh"], c["min_kept"], c["groups"])
        expected = torch.zeros_like(c["valid"])
        for k in range(c["groups"]):
            prob, valid = c["prob"][k::c["groups"]], c["valid"][k::c["groups"]]
            expected[k::c["groups"]] = reference_select(prob, valid, c["thresh"], c["min_kept"])
            under = (valid & (prob <= c["thresh"])).sum()
            binding += bool(under < c["min_kept"] < valid.sum())
            loose += bool(0 < c["min_kept"] <= under)
        assert torch.equal(fast, expected), c
    assert binding > 20 and loose > 20  # both regimes of min_kept were exercised


def test_fast_mask_keeps_exactly_the_reference_pixels_on_random_logits():
    gen = torch.Generator().manual_seed(1)
    for case in range(60):
        n, c = int(torch.randint(1, 4, (1,), generator=gen)), int(torch.randint(2, 6, (1,), generator=gen))
        logits = torch.randn(n, c, 6, 7, generator=gen, dtype=torch.float64) * 3
        if case % 2:  # a few distinct logit vectors: many pixels share one probability (ties)
            logits = logits.round()
        target = torch.randint(0, c, (n, 6, 7), generator=gen)
        target[torch.rand(n, 6, 7, generator=gen) < 0.2] = 255
        min_kept = int(torch.randint(0, n * 42 + 3, (1,), generator=gen))
        thresh = [0.7, 0.3][case % 2]
        expected = reference_select(reference_prob(logits, target), target != 255, thresh, min_kept)
        assert torch.equal(ohem_keep_mask(logits, target, thresh, min_kept), expected), case


def test_hand_built_example_matches_the_reference():
    logits, target = example()
    for min_kept in (0, 2, 5, 6, 7, 9, 10, 11, 13, 100):
        expected = reference_select(reference_prob(logits, target), target != 255, 0.7, min_kept)
        assert torch.equal(ohem_keep_mask(logits, target, 0.7, min_kept), expected), min_kept


@pytest.mark.parametrize("name,group_images", [("ohem", 0), ("ohem", 1), ("ohem", 2), ("ce", 0), ("ce", 2)])
def test_loss_and_gradient_equal_the_reference(name, group_images, monkeypatch):
    import harness.engine.losses

    monkeypatch.setattr(harness.engine.losses, "CHUNK_ELEMENTS", 700)  # several chunks per batch, one image each
    gen = torch.Generator().manual_seed(2)
    spec = LossSpec(name=name, ohem_thresh=0.6, ohem_min_kept=150, aux_weights=[0.4])
    for case in range(6):
        n = 5 if case % 2 else 4  # 5 images: strided groups of unequal size
        main = (torch.randn(n, 7, 10, 12, generator=gen, dtype=torch.float64) * 2).requires_grad_()
        aux = torch.randn(n, 7, 5, 6, generator=gen, dtype=torch.float64).requires_grad_()
        target = torch.randint(0, 7, (n, 10, 12), generator=gen)
        target[torch.rand(n, 10, 12, generator=gen) < 0.25] = 255
        loss = SegmentationLoss(spec, group_images=group_images)((main, aux), target)
        grads = torch.autograd.grad(loss, (main, aux))
        expected = reference_loss((main, aux), target, spec, group_images)
        expected_grads = torch.autograd.grad(expected, (main, aux))
        assert loss.item() == pytest.approx(expected.item(), rel=1e-10)
        for got, want in zip(grads, expected_grads):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_nan_logits_of_an_ignored_pixel_stay_out_of_the_loss():
    logits, target = example()
    logits = logits.clone()
    logits[0, :, 0, -1] = float("nan")  # the last pixel is ignored
    spec = LossSpec(name="ohem", ohem_thresh=0.7, ohem_min_kept=7)
    loss = SegmentationLoss(spec)(logits, target)
    assert torch.isfinite(loss) and loss.item() == pytest.approx(reference_loss(logits, target, spec).item(), rel=1e-12)


def test_bf16_logits_match_the_fp32_reference_and_keep_their_dtype():
    gen = torch.Generator().manual_seed(3)
    main = (torch.randn(2, 5, 16, 16, generator=gen) * 2).bfloat16().requires_grad_()
    target = torch.randint(0, 5, (2, 16, 16), generator=gen)
    spec = LossSpec(name="ce", ohem_thresh=0.7, ohem_min_kept=100_000)
    loss = SegmentationLoss(spec)(main, target)
    assert loss.dtype == torch.float32
    (grad,) = torch.autograd.grad(loss, main)
    assert grad.dtype == torch.bfloat16
    reference = reference_loss(main.float(), target, spec)
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)
    torch.testing.assert_close(grad.float(), torch.autograd.grad(reference, main)[0].float(), rtol=1e-2, atol=1e-5)


def test_no_fp32_tensor_the_size_of_the_upsampled_logits_is_created(monkeypatch):
    """bf16 logits upsampled 4x: forward and backward create no fp32 tensor of a full batch's size (only
    chunk-sized fp32 temporaries and one value per pixel)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    import harness.engine.losses

    monkeypatch.setattr(harness.engine.losses, "CHUNK_ELEMENTS", 19 * 32 * 32)  # one image per chunk
    full = 4 * 19 * 32 * 32
    largest = {}

    class Sizes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    largest[t.dtype] = max(largest.get(t.dtype, 0), t.numel())
            return out

    logits = torch.randn(4, 19, 8, 8).bfloat16().requires_grad_()
    target = torch.randint(0, 19, (4, 32, 32))
    with Sizes():
        SegmentationLoss(LossSpec(name="ohem", ohem_thresh=0.7, ohem_min_kept=500))(logits, target).backward()
    assert largest[torch.bfloat16] >= full  # the upsampled logits and their gradient, as expected
    assert 0 < largest[torch.float32] < full


# --- no host synchronisation ------------------------------------------------------------------------------------


def loss_inputs(device: str):
    gen = torch.Generator().manual_seed(4)
    main = torch.randn(4, 19, 16, 16, generator=gen).to(device).requires_grad_()
    aux = torch.randn(4, 19, 8, 8, generator=gen).to(device).requires_grad_()
    target = torch.randint(0, 19, (4, 64, 64), generator=gen)
    target[:, :8] = 255
    return (main, aux), target.to(device)


def test_the_loss_never_reads_a_value_back_to_the_host(monkeypatch):
    """CPU: every Python-level way of reading a tensor's value raises, and a dispatch mode rejects the ATen ops
    that do so underneath (.item()'s _local_scalar_dense, nonzero, boolean-mask indexing), through forward
    and backward, for OHEM with min_kept binding, not binding, and above the pixel count, and for CE."""
    from torch.utils._python_dispatch import TorchDispatchMode

    aten = torch.ops.aten
    forbidden = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
                 aten.unique_consecutive.default, aten._unique2.default}

    class NoSync(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            indices = args[1] if func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default) else ()
            if func in forbidden or any(i is not None and i.dtype == torch.bool for i in indices):
                raise AssertionError(f"host synchronisation: {func}")
            return func(*args, **(kwargs or {}))

    def refuse(*args, **kwargs):
        raise AssertionError("a tensor value was read on the host")

    outputs, target = loss_inputs("cpu")
    specs = [LossSpec(name="ohem", ohem_thresh=0.7, ohem_min_kept=k, aux_weights=[0.4]) for k in (0, 50, 3000, 10**6)]
    specs.append(LossSpec(name="ce", ohem_thresh=0.7, ohem_min_kept=100_000, aux_weights=[0.4]))
    with monkeypatch.context() as patch:
        for name in ("item", "__bool__", "__int__", "__float__", "__index__", "tolist", "nonzero"):
            patch.setattr(torch.Tensor, name, refuse)
        patch.setattr(torch, "nonzero", refuse)
        losses = []
        for spec in specs:
            with NoSync():
                loss = SegmentationLoss(spec, group_images=2)(outputs, target)
                loss.backward()
            losses.append(loss)
    assert all(torch.isfinite(loss) for loss in losses)
    with pytest.raises(AssertionError, match="host synchronisation"), NoSync():
        outputs[0].sum().item()  # the detector does detect


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_loss_never_synchronises_the_gpu():
    outputs, target = loss_inputs("cuda")
    loss_fn = SegmentationLoss(LossSpec(name="ohem", ohem_thresh=0.7, ohem_min_kept=3000, aux_weights=[0.4]), group_images=2)
    loss_fn(outputs, target).backward()  # warm-up: lazy initialisation may synchronise once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(outputs, target)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss)


# --- deterministic kernels ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("size_in,size_out", [((4, 5), (16, 20)), ((7, 3), (10, 11)), ((9, 9), (4, 6)), ((1, 2), (3, 3))])
def test_matrix_upsampling_equals_interpolate(size_in, size_out):
    from harness.engine.losses import upsample_logits

    x = torch.randn(2, 3, *size_in, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(2, 3, *size_out, dtype=torch.float64)
    fast = upsample_logits(x, size_out, deterministic=True)
    reference = torch.nn.functional.interpolate(x, size=size_out, mode="bilinear", align_corners=False)
    torch.testing.assert_close(fast, reference, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad((fast * weights).sum(), x)[0],
                               torch.autograd.grad((reference * weights).sum(), x)[0], rtol=1e-12, atol=1e-12)


def test_matrix_upsampling_stays_fp32_under_autocast():
    from harness.engine.losses import upsample_logits

    x = torch.randn(1, 4, 5, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = upsample_logits(x, (15, 16), deterministic=True)
    assert fast.dtype == torch.float32
    torch.testing.assert_close(fast, torch.nn.functional.interpolate(x, size=(15, 16), mode="bilinear"))


def test_uint8_labels_give_the_same_loss():
    (main, aux), target = loss_inputs("cpu")
    loss_fn = SegmentationLoss(LossSpec(name="ohem", ohem_thresh=0.7, ohem_min_kept=3000, aux_weights=[0.4]), group_images=2)
    assert loss_fn((main, aux), target.to(torch.uint8)).item() == loss_fn((main, aux), target).item()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_loss_runs_and_repeats_bitwise_under_deterministic_algorithms_on_cuda(monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # as `bench run --deterministic` sets it
    outputs, target = loss_inputs("cuda")
    loss_fn = SegmentationLoss(LossSpec(name="ohem", ohem_thresh=0.7, ohem_min_kept=3000, aux_weights=[0.4]), group_images=2)
    torch.use_deterministic_algorithms(True)
    try:
        runs = []
        for _ in range(2):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = loss_fn(outputs, target)
            runs.append((loss.detach(), *torch.autograd.grad(loss, outputs)))
    finally:
        torch.use_deterministic_algorithms(False)
    assert all(torch.equal(a, b) for a, b in zip(*runs))
