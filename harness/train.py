"""The training loop: SGD with a per-iteration poly schedule, weighted auxiliary losses, timm EMA."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch
from timm.utils import ModelEmaV3
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from harness.errors import BenchError
from harness.evaluate import evaluate
from harness.losses import SegmentationLoss
from harness.metrics import SegMetrics
from harness.spec import Spec


@dataclass
class TrainPlan:
    """What this run actually does: the spec's recipe, or the synthetic budget, plus CLI overrides."""

    iters: int
    batch_size: int
    crop_size: list[int]
    test_size: list[int]
    scale_range: list[float]
    lr: float
    ema_decay: float
    ema_warmup: bool
    log_every: int
    eval_every: int
    ohem_min_kept: int
    workers: int
    seed: int = 0


@dataclass
class TrainResult:
    metrics: SegMetrics
    ema_metrics: Optional[SegMetrics]
    history: list[dict] = field(default_factory=list)
    wall_time_s: float = 0.0


def poly_factor(iteration: int, max_iters: int, power: float, base_lr: float, min_lr: float) -> float:
    """Multiplier of the base learning rate: poly decay from base_lr to min_lr over max_iters."""
    progress = min(iteration, max_iters) / max(max_iters, 1)
    return ((1 - progress) ** power * (base_lr - min_lr) + min_lr) / base_lr


def infinite(loader: DataLoader) -> Iterator:
    epoch = 0
    while True:
        sampler = getattr(loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


MetricsLogger = Callable[[dict[str, float], int], None]


def fit(spec: Spec, plan: TrainPlan, model: nn.Module, train_loader: DataLoader, val_loader: DataLoader,
        device: torch.device, log_metrics: MetricsLogger, progress: bool = True) -> TrainResult:
    model.to(device).train()
    criterion = SegmentationLoss(spec.loss, min_kept=plan.ohem_min_kept)
    optimizer = torch.optim.SGD(model.parameters(), lr=plan.lr, momentum=spec.train.momentum,
                                weight_decay=spec.train.weight_decay)
    min_lr = min(spec.train.min_lr, plan.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda it: poly_factor(it, plan.iters, spec.train.poly_power, plan.lr, min_lr))
    ema = ModelEmaV3(model, decay=plan.ema_decay, use_warmup=plan.ema_warmup) if spec.columns.ema else None

    def run_eval(step: int) -> tuple[SegMetrics, Optional[SegMetrics]]:
        metrics = evaluate(model, val_loader, device, desc="eval raw", progress=progress)
        logged = {"val_miou": metrics.miou, "val_pixel_accuracy": metrics.pixel_accuracy}
        ema_metrics = None
        if ema is not None:
            ema_metrics = evaluate(ema.module, val_loader, device, desc="eval ema", progress=progress)
            logged.update(val_miou_ema=ema_metrics.miou, val_pixel_accuracy_ema=ema_metrics.pixel_accuracy)
        log_metrics(logged, step)
        return metrics, ema_metrics

    start = time.perf_counter()
    history: list[dict] = []
    batches = infinite(train_loader)
    bar = tqdm(range(plan.iters), desc=spec.row, disable=not progress, dynamic_ncols=True)
    window_images, window_start = 0, time.perf_counter()
    for iteration in bar:
        images, labels = next(batches)
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        loss = criterion(model(images), labels)
        if not torch.isfinite(loss):
            raise BenchError(
                f"loss is {loss.item()} at iteration {iteration + 1}; training diverged "
                f"(lower train.lr, now {plan.lr})"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if ema is not None:
            ema.update(model, step=iteration)
        step = iteration + 1
        window_images += images.shape[0]
        if step % plan.log_every == 0 or step == plan.iters:
            elapsed = time.perf_counter() - window_start
            record = {"train_loss": loss.item(), "lr": optimizer.param_groups[0]["lr"],
                      "images_per_s": window_images / max(elapsed, 1e-9)}
            history.append({"step": step, **record})
            log_metrics(record, step)
            bar.set_postfix(loss=f"{record['train_loss']:.3f}", lr=f"{record['lr']:.2e}",
                            img_s=f"{record['images_per_s']:.1f}")
            window_images, window_start = 0, time.perf_counter()
        if plan.eval_every and step % plan.eval_every == 0 and step != plan.iters:
            run_eval(step)
    metrics, ema_metrics = run_eval(plan.iters)
    return TrainResult(metrics, ema_metrics, history, time.perf_counter() - start)


def iterations_for(epochs: int, train_images: int, batch_size: int) -> int:
    return math.ceil(epochs * train_images / batch_size)
