"""The resolved recipe of one run (`TrainPlan`): the spec's United-Perception recipe on Cityscapes, or its
CPU-sized synthetic budget, plus the command line's overrides. The training and evaluation loops read nothing
else, so what a run trained is what its plan says; a checkpoint keeps it, and a resume with another plan is refused.

The planned budget has one formula (`planned_iterations`): the table's epochs of ceil(train images / global batch)
iterations, as UP counted an epoch. The counting rule (harness.report.verdicts) and `bench run` both use it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from harness.config.benchmark import OFFICIAL_SPLIT_IMAGES, SYNTHETIC_DATASET, UP_GPUS
from harness.config.spec import LossSpec, Spec
from harness.errors import BenchError

SYNTHETIC_LOSS_GROUPS = 2  # the synthetic batch keeps two UP-style loss groups, so 1 and 2 processes agree


@dataclass
class TrainPlan:
    """The whole recipe this run trains and evaluates with."""

    row: str
    iters: int
    iters_per_epoch: int
    batch_size: int  # global, over all processes
    crop_size: list[int]
    test_size: list[int]
    scale_range: list[float]
    flip: bool
    pad_value: int
    mean: list[float]
    std: list[float]
    lr: float  # global: UP's per-image lr times the global batch
    momentum: float
    weight_decay: float
    warmup_iters: int
    warmup_ratio: float
    poly_power: float
    min_lr: float
    ema: bool
    ema_decay: float
    ema_ramp: float
    loss: str
    ohem_thresh: float
    ohem_min_kept: int
    aux_weights: list[float]
    loss_group_images: int  # UP's per-GPU batch: OHEM selects, and the loss averages, per group of images
    freeze_bn: bool
    eval_every: int  # iterations; 0: only at the end
    log_every: int
    checkpoint_every: int
    keep_checkpoints: int  # periodic checkpoints kept besides best.pt
    workers: int
    # The test mode, at this plan's test size (a synthetic run's crops shrink with its test size).
    crop_test: Optional[list[int]]
    crop_stride: Optional[list[int]]
    eval_flip: bool
    eval_scales: list[float]
    seed: int = 0
    precision: str = "fp32"
    world_size: int = 1

    def loss_spec(self) -> LossSpec:
        return LossSpec(name=self.loss, ohem_thresh=self.ohem_thresh, ohem_min_kept=self.ohem_min_kept,
                        aux_weights=list(self.aux_weights))


# How many loader processes feed a run changes no sample or step: a resume on another machine may differ there.
MACHINE_FIELDS = ("workers",)


def size_pair(size: list[int]) -> tuple[int, int]:
    """A [width, height] list of the plan as the pair the transforms take."""
    return int(size[0]), int(size[1])


def iterations_per_epoch(train_images: int, batch_size: int) -> int:
    """UP's epoch: every image once (the last batch padded with repeats), ceil(images / global batch)."""
    return math.ceil(train_images / batch_size)


def planned_iterations(spec: Spec, train_images: int = OFFICIAL_SPLIT_IMAGES["train"]) -> int:
    """The row's full budget: the table's epochs over `train_images` (by default the official train split)."""
    return spec.columns.epochs * iterations_per_epoch(train_images, spec.columns.batch_size)


def dataset_batch(spec: Spec, synthetic: bool) -> tuple[str, int]:
    """The global batch a run trains with on its dataset, and the spec key that sets it."""
    if synthetic:
        return "synthetic.batch_size", spec.synthetic.batch_size
    return "columns.batch_size", spec.columns.batch_size


def batch_split_problem(batch: int, processes: int) -> Optional[tuple[str, str]]:
    """(what is wrong, the fix) when the global batch does not divide over the processes; None when it does."""
    if batch % processes == 0:
        return None
    divisors = ", ".join(str(n) for n in range(1, batch + 1) if batch % n == 0)
    return (f"batch size {batch} does not divide over {processes} processes",
            f"use a process count among {divisors} (the global batch is the spec's, whatever the GPU count)")


def batch_per_process(batch: int, processes: int) -> int:
    """Images each process takes of the global batch; a batch that does not divide is a one-line error."""
    problem = batch_split_problem(batch, processes)
    if problem:
        raise BenchError("; ".join(problem))
    return batch // processes


def loss_group_images(spec: Spec, synthetic: bool = False) -> int:
    """UP's per-GPU batch, the group the loss (and SFNet's head batch norms) work on: the global batch over UP's 8
    GPUs; a synthetic batch keeps two such groups."""
    if synthetic:
        return max(1, spec.synthetic.batch_size // SYNTHETIC_LOSS_GROUPS)
    return max(1, spec.columns.batch_size // UP_GPUS)


@dataclass(frozen=True)
class Budget:
    """What differs between the table's recipe on Cityscapes and a row's CPU-sized synthetic budget."""

    iters: int
    iters_per_epoch: int
    batch_size: int
    crop_size: list[int]
    test_size: list[int]
    scale_range: list[float]
    lr: float
    warmup_iters: int
    ema_decay: float
    ema_ramp: float
    ohem_min_kept: int
    loss_group_images: int
    eval_every: int
    log_every: int
    checkpoint_every: int
    keep_checkpoints: int
    workers: int


def table_budget(spec: Spec, train_images: int, machine_workers: int) -> Budget:
    """UP's recipe: `train.workers`, or `machine_workers` when the spec leaves the count to the machine."""
    t, (_, batch) = spec.train, dataset_batch(spec, synthetic=False)
    per_epoch = iterations_per_epoch(train_images, batch)
    return Budget(iters=planned_iterations(spec, train_images), iters_per_epoch=per_epoch, batch_size=batch,
                  crop_size=t.crop_size, test_size=spec.columns.test_size, scale_range=t.scale_range,
                  lr=t.lr_per_image * batch, warmup_iters=t.warmup_iters, ema_decay=t.ema_decay,
                  ema_ramp=t.ema_ramp, ohem_min_kept=spec.loss.ohem_min_kept,
                  loss_group_images=loss_group_images(spec), eval_every=t.eval_every_epochs * per_epoch,
                  log_every=t.log_every, checkpoint_every=t.checkpoint_every, keep_checkpoints=t.keep_checkpoints,
                  workers=t.workers if t.workers is not None else machine_workers)


def synthetic_budget(spec: Spec, train_images: int) -> Budget:
    """The same recipe at CPU size: the spec's `synthetic:` iterations, batch, crops, lr and EMA ramp."""
    s, (_, batch) = spec.synthetic, dataset_batch(spec, synthetic=True)
    return Budget(iters=s.iters, iters_per_epoch=iterations_per_epoch(train_images, batch),
                  batch_size=batch, crop_size=s.crop_size, test_size=s.test_size, scale_range=s.scale_range,
                  lr=s.lr, warmup_iters=s.warmup_iters, ema_decay=s.ema_decay, ema_ramp=s.ema_ramp,
                  ohem_min_kept=s.ohem_min_kept, loss_group_images=loss_group_images(spec, synthetic=True),
                  eval_every=s.eval_every, log_every=s.log_every, checkpoint_every=s.checkpoint_every,
                  keep_checkpoints=s.keep_checkpoints, workers=s.workers)


def scaled_test_crop(spec: Spec, test_size: list[int]) -> tuple[Optional[list[int]], Optional[list[int]]]:
    """The row's sliding-window crop and stride at `test_size`: at another size than the table's (a synthetic run)
    both shrink by the same ratio, so the run exercises the same window layout on smaller images."""
    crop, stride = spec.columns.crop_test, spec.eval.crop_stride
    if crop is None or list(test_size) == list(spec.columns.test_size):
        return crop, stride
    ratio = [t / c for t, c in zip(test_size, spec.columns.test_size)]
    return ([max(1, round(v * r)) for v, r in zip(crop, ratio)],
            [max(1, round(v * r)) for v, r in zip(stride, ratio)] if stride is not None else None)


def make_plan(spec: Spec, dataset: str, train_images: int, *, precision: str = "fp32", world_size: int = 1,
              machine_workers: int = 0, seed: int = 0, iters: Optional[int] = None,
              eval_every: Optional[int] = None) -> TrainPlan:
    """The plan of `spec` on `dataset` ("synthetic": its synthetic budget) with `train_images` training images,
    and the command line's overrides (already validated): `iters`, `eval_every` and the seed."""
    budget = synthetic_budget(spec, train_images) if dataset == SYNTHETIC_DATASET else \
        table_budget(spec, train_images, machine_workers)
    t = spec.train
    crop_test, crop_stride = scaled_test_crop(spec, budget.test_size)
    planned_iters = budget.iters if iters is None else iters
    return TrainPlan(
        row=spec.row, iters=planned_iters, iters_per_epoch=budget.iters_per_epoch, batch_size=budget.batch_size,
        crop_size=list(budget.crop_size), test_size=list(budget.test_size), scale_range=list(budget.scale_range),
        flip=t.flip, pad_value=t.pad_value, mean=list(spec.data.mean), std=list(spec.data.std), lr=budget.lr,
        momentum=t.momentum, weight_decay=t.weight_decay, warmup_iters=min(budget.warmup_iters, planned_iters),
        warmup_ratio=t.warmup_ratio, poly_power=t.poly_power, min_lr=t.min_lr, ema=spec.columns.ema,
        ema_decay=budget.ema_decay, ema_ramp=budget.ema_ramp, loss=spec.loss.name,
        ohem_thresh=spec.loss.ohem_thresh, ohem_min_kept=budget.ohem_min_kept,
        aux_weights=list(spec.loss.aux_weights), loss_group_images=budget.loss_group_images, freeze_bn=t.freeze_bn,
        eval_every=budget.eval_every if eval_every is None else eval_every,
        log_every=max(1, min(budget.log_every, planned_iters)), checkpoint_every=budget.checkpoint_every,
        keep_checkpoints=budget.keep_checkpoints, workers=budget.workers, crop_test=crop_test,
        crop_stride=crop_stride, eval_flip=spec.eval.flip, eval_scales=list(spec.eval.scales), seed=seed,
        precision=precision, world_size=world_size,
    )
