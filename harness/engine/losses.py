"""Segmentation losses: cross entropy or OHEM cross entropy, summed over the main and auxiliary outputs.

Built to cost little next to the network and to never stop the host:

- The per-pixel cross entropy is computed in fp32 a few images at a time (`TargetNLL`), so no fp32 tensor the
  size of the upsampled logits is ever kept; only the fp32 log-partition (one value per pixel) is saved for
  the backward pass. Its kernels (logsumexp, gather, exp, scatter of unique indices, plain sums) are
  deterministic on CUDA, unlike `F.cross_entropy(reduction="sum")` (nll_loss2d's atomics).
- OHEM's threshold is found on the device: one `topk` per group of images on the true-class probabilities,
  chosen with `torch.where`; nothing reads a value back to the host, and no shape depends on the data.
- Bilinear upsampling of the logits has no deterministic CUDA backward; under
  `torch.use_deterministic_algorithms(True)` on a GPU it is computed as two matrix products instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from harness.config.spec import LossSpec
from harness.errors import BenchError

# fp32 elements per chunk of the cross entropy: bounds its fp32 temporaries (~128 MB each) whatever the batch.
CHUNK_ELEMENTS = 1 << 25


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _image_chunks(shape: torch.Size) -> list[slice]:
    per_image = max(1, shape[1:].numel())
    step = max(1, CHUNK_ELEMENTS // per_image)
    return [slice(start, min(start + step, shape[0])) for start in range(0, shape[0], step)]


class TargetNLL(torch.autograd.Function):
    """-log softmax(logits)[target] per pixel, (N, C, H, W) x (N, H, W) -> (N, H, W) in fp32 (fp64 for fp64
    logits). `target` must hold class indices (clamp ignored labels first; weight them 0 downstream)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        acc = _accumulation_dtype(logits.dtype)
        with torch.autocast(logits.device.type, enabled=False):
            lse = torch.empty(target.shape, dtype=acc, device=logits.device)
            for rows in _image_chunks(logits.shape):
                lse[rows] = torch.logsumexp(logits[rows].to(acc), dim=1)
            picked = logits.gather(1, target.unsqueeze(1)).squeeze(1).to(acc)
        ctx.save_for_backward(logits, target, lse)
        return lse - picked

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        logits, target, lse = ctx.saved_tensors
        acc = lse.dtype
        grad = grad.to(acc)
        grad_logits = torch.empty_like(logits)
        with torch.autocast(logits.device.type, enabled=False):
            for rows in _image_chunks(logits.shape):
                # d nll / d logits = softmax - one_hot(target), scaled by the incoming per-pixel gradient.
                g = grad[rows].unsqueeze(1)
                part = (logits[rows].to(acc) - lse[rows].unsqueeze(1)).exp_().mul_(g)
                index = target[rows].unsqueeze(1)
                part.scatter_(1, index, part.gather(1, index) - g)  # unique index per pixel: deterministic
                grad_logits[rows] = part
        return grad_logits, None


def target_nll(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-pixel cross entropy against `target` (class indices), without fp32 copies of the whole batch."""
    return TargetNLL.apply(logits, target)


def _interpolation_matrix(size_in: int, size_out: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(size_out, size_in) weights of 1-D linear interpolation with align_corners=False, as ATen computes them
    for an output size (source = (dst + 0.5) x in / out - 0.5, clamped at 0; the right neighbour clamped)."""
    dst = torch.arange(size_out, device=device, dtype=torch.float64)
    src = ((dst + 0.5) * (size_in / size_out) - 0.5).clamp(min=0)
    left = src.floor()
    right = (left + 1).clamp(max=size_in - 1)
    frac = src - left
    columns = torch.arange(size_in, device=device, dtype=torch.float64)
    # Built by comparison, not one_hot or index_put, so it needs no host read and no atomics.
    matrix = (columns == left[:, None]) * (1 - frac[:, None]) + (columns == right[:, None]) * frac[:, None]
    return matrix.to(dtype)


def upsample_logits(logits: torch.Tensor, size: Sequence[int], deterministic: Optional[bool] = None) -> torch.Tensor:
    """Bilinear resize (align_corners=False) of (N, C, h, w) logits to `size` (H, W).

    `deterministic` (default: deterministic algorithms are on and the tensor is on an accelerator, where
    interpolate's backward uses atomics and raises) computes it as A_h @ x @ A_w^T, whose backward is two
    deterministic matrix products. That fallback works in fp32 (bf16 would round the interpolation weights)
    and returns fp32 logits: a cost paid only in deterministic runs."""
    size = tuple(int(s) for s in size)
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled() and logits.device.type != "cpu"
    if not deterministic:
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
    dtype = _accumulation_dtype(logits.dtype)
    rows = _interpolation_matrix(logits.shape[-2], size[0], logits.device, dtype)
    cols = _interpolation_matrix(logits.shape[-1], size[1], logits.device, dtype)
    with torch.autocast(logits.device.type, enabled=False):
        return torch.matmul(torch.matmul(rows, logits.to(dtype)), cols.t())


def class_indices(target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Labels as int64 class indices for gather; ignored labels land on a valid class and are weighted 0."""
    return target.clamp(min=0, max=num_classes - 1).long()


def _grouped(values: torch.Tensor, groups: int, fill: float | bool) -> torch.Tensor:
    """(N, ...) -> (groups, M x P): row k holds images k, k + groups, k + 2 x groups, ... (the strided groups),
    padded with `fill` where the batch does not divide evenly. Shapes depend on N alone."""
    n = values.shape[0]
    flat = values.reshape(n, -1)
    per_group = -(-n // groups)
    if per_group * groups != n:
        flat = torch.cat([flat, flat.new_full((per_group * groups - n, flat.shape[1]), fill)])
    return flat.view(per_group, groups, -1).transpose(0, 1).reshape(groups, -1)


def _per_image(values: torch.Tensor, n: int, ndim: int) -> torch.Tensor:
    """(groups,) -> (N, 1, ...) broadcastable over an image: image i takes group i % groups."""
    per_group = -(-n // values.shape[0])
    return values.repeat(per_group)[:n].view(n, *([1] * (ndim - 1)))


def ohem_select(prob: torch.Tensor, valid: torch.Tensor, thresh: float, min_kept: int, groups: int = 1) -> torch.Tensor:
    """OHEM's rule on true-class probabilities `prob` (N, ...) with `valid` marking the labelled pixels, for each
    strided group of images: keep the valid pixels whose probability is not above max(thresh, p_k), p_k the
    min_kept-th smallest valid probability (NaN counts as the largest, and max(thresh, NaN) is thresh); keep
    every valid pixel when min_kept >= the group's valid count. NaN probabilities are always kept."""
    n, ndim = prob.shape[0], prob.dim()
    keep_all = _grouped(valid, groups, False).sum(1) <= min_kept
    slice_size = -(-n // groups) * prob[0].numel()
    if 0 < min_kept < slice_size:
        # Sentinels outside [0, 1] so topk never meets a NaN: 2 stands for NaN, 3 for an ignored pixel.
        key = torch.where(valid, torch.where(prob.isnan(), 2.0, prob), 3.0)
        kth = _grouped(key, groups, 3.0).topk(min_kept, dim=1, largest=False, sorted=False).values.amax(dim=1)
        threshold = torch.where((kth > thresh) & (kth <= 1.0), kth, thresh)
    else:  # min_kept 0: the threshold alone; min_kept >= every group's pixels: keep_all decides
        threshold = torch.full((groups,), thresh, dtype=prob.dtype, device=prob.device)
    # `not above` rather than `at most`: a NaN probability (a diverged network) stays in the loss, so the
    # divergence check sees it instead of OHEM silently dropping every pixel.
    keep = valid & ~(prob > _per_image(threshold, n, ndim))
    return keep | (valid & _per_image(keep_all, n, ndim))


def ohem_keep_mask(logits: torch.Tensor, target: torch.Tensor, thresh: float, min_kept: int,
                   ignore_index: int = 255) -> torch.Tensor:
    """Pixels OHEM trains on (lxtGH `OhemCrossEntropy2dTensor`), the whole batch as one group.

    Among valid pixels, keep those whose true-class probability is at most max(thresh, p_k), where
    p_k is the min_kept-th smallest such probability: the hard pixels, and never fewer than min_kept.
    """
    valid = target != ignore_index
    with torch.no_grad():
        prob = target_nll(logits, class_indices(target, logits.shape[1])).neg_().exp_()
    return ohem_select(prob, valid, thresh, min_kept)


class SegmentationLoss(nn.Module):
    """Main output weight 1, auxiliary outputs weighted as the spec says; logits upsampled to the label size.

    UP computed its loss on each GPU's images (OHEM's min_kept counts the pixels of one GPU's batch) and
    DDP averaged the GPUs' means. `group_images` reproduces that whatever the process count: the batch is
    cut into groups of that many images (UP's per-GPU batch), each group's loss is the mean over its kept
    pixels, and the loss is the mean over groups; DDP's average over processes then equals the mean over
    all groups of the global batch. 0 makes the whole batch one group.
    """

    def __init__(self, spec: LossSpec, ignore_index: int = 255, min_kept: int | None = None, group_images: int = 0):
        super().__init__()
        if spec.name not in ("ce", "ohem"):
            raise BenchError(f"loss.name: unknown loss '{spec.name}'; use 'ce' or 'ohem'")
        self.spec = spec
        self.ignore_index = ignore_index
        self.min_kept = spec.ohem_min_kept if min_kept is None else min_kept
        self.group_images = group_images

    def single(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.shape[-2:] != target.shape[-2:]:
            logits = upsample_logits(logits, target.shape[-2:])
        # Strided groups (images k, k + groups, ...): the sampler deals a global batch round-robin to the
        # processes, so these are the same groups of the same images on any number of processes.
        groups = max(1, logits.shape[0] // self.group_images) if self.group_images else 1
        valid = target != self.ignore_index
        nll = target_nll(logits, class_indices(target, logits.shape[1]))
        keep = valid
        if self.spec.name == "ohem":
            keep = ohem_select(nll.detach().neg().exp_(), valid, self.spec.ohem_thresh, self.min_kept, groups)
        # where, not a product with the mask: a NaN in a dropped pixel must not reach the sum.
        total = _grouped(torch.where(keep, nll, 0.0), groups, 0.0).sum(1)
        count = _grouped(keep, groups, False).sum(1).clamp(min=1)
        return (total / count).mean()

    def forward(self, outputs: torch.Tensor | Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        if isinstance(outputs, torch.Tensor):
            outputs = (outputs,)
        main, *aux = outputs
        if len(aux) != len(self.spec.aux_weights):
            raise BenchError(
                f"loss.aux_weights: the model returns {len(aux)} auxiliary outputs but the spec gives "
                f"{len(self.spec.aux_weights)} weights; list one weight per auxiliary head"
            )
        loss = self.single(main, target)
        for weight, logits in zip(self.spec.aux_weights, aux):
            loss = loss + weight * self.single(logits, target)
        return loss
