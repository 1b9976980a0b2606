"""The training loop and its one step: SGD with a per-iteration poly schedule, weighted auxiliary losses, UP's EMA,
DDP over any number of processes, mixed precision, atomic checkpoints, exact resume.

`Trainer.train_step` is the only training step in the project: `bench run` trains with it and `bench speed`
times it, on an optimizer built by the same `make_optimizer`.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Optional

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from harness.config.curves import val_curve
from harness.config.plan import TrainPlan, size_pair
from harness.config.precision import PLAIN, Compute, resolve_compute
from harness.data.augment import EvalTransform, TrainTransform
from harness.data.loaders import endless_batches
from harness.engine import checkpoint
from harness.engine.device import peak_memory_gib
from harness.engine.distributed import ShardedTrainSampler, World, all_reduce_sum, broadcast_object, broadcast_tensors
from harness.engine.ema import ExpEMA
from harness.engine.evaluate import TestMode, evaluate
from harness.engine.losses import SegmentationLoss
from harness.engine.metrics import SegMetrics
from harness.errors import BenchError
from harness.logs import bar_fits
from harness.models.common import GroupedBatchNorm2d, set_norm_groups

log = logging.getLogger(__name__)


@dataclass
class Score:
    """One evaluation's mIoU and the iteration it was taken at."""

    miou: float
    iteration: int


@dataclass
class TrainResult:
    metrics: SegMetrics  # final raw weights
    ema_metrics: Optional[SegMetrics]  # final EMA weights
    checkpoint: Optional[Path]
    best: Optional[Score] = None  # best raw evaluation over the run
    best_ema: Optional[Score] = None
    best_checkpoint: Optional[Path] = None
    history: list[dict] = field(default_factory=list)


class Diverged(BenchError):
    pass


class StoppedBehind(Exception):
    """The run's evaluation at `iteration` fell behind its earlier runs and it was asked to stop then
    (`--stop-if-behind`): a checkpoint was written there (`path`), from which `--resume` continues."""

    def __init__(self, iteration: int, path: Optional[Path], reason: str):
        super().__init__(f"stopped behind at iteration {iteration}: {reason}")
        self.iteration, self.path, self.reason = iteration, path, reason


class Interrupted(Exception):
    """SIGTERM or SIGINT arrived: a checkpoint was written at `iteration` (`path`), or, after a second SIGINT, the
    run stopped at once and `path` is the last checkpoint written before (None if there was none)."""

    def __init__(self, signum: int, iteration: int, path: Optional[Path], at_once: bool = False):
        name = signal.Signals(signum).name
        super().__init__(f"stopped at once by a second {name} at iteration {iteration}, without a checkpoint"
                         if at_once else f"stopped by {name} at iteration {iteration}")
        self.signum, self.iteration, self.path, self.at_once = signum, iteration, path, at_once


def learning_rate(iteration: int, plan: TrainPlan) -> float:
    """The lr of 0-based `iteration`, as UP's ChainIterLR(polylr) with linear warm-up computes it
    (up/utils/model/lr_helper.py): linear from warmup_ratio x lr to lr over the warm-up iterations, then
    poly decay counted from iteration 0 (not from the end of warm-up) down to min_lr at `iters`."""
    if iteration < plan.warmup_iters:
        start = plan.warmup_ratio * plan.lr
        return start + (plan.lr - start) * iteration / max(1, plan.warmup_iters - 1)
    progress = min(iteration, plan.iters) / plan.iters
    return (plan.lr - plan.min_lr) * (1 - progress) ** plan.poly_power + plan.min_lr


def rng_state() -> dict[str, Any]:
    numpy_state: tuple[Any, ...] = tuple(np.random.get_state())
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": [numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)), *numpy_state[2:]],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))


def convert_norm(model: nn.Module, world: World, device_type: str) -> nn.Module:
    """SyncBatchNorm across GPUs: the table's recipes normalise over the global batch, not per GPU. Layers UP
    normalised per GPU (GroupedBatchNorm2d, SFNet's head) stay per process: they group UP's per-GPU batches."""
    if not (world.distributed and device_type == "cuda"):
        return model
    if isinstance(model, nn.modules.batchnorm._BatchNorm) and not isinstance(model, GroupedBatchNorm2d):
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in model.named_children():
        if not isinstance(child, GroupedBatchNorm2d):
            setattr(model, name, convert_norm(child, world, device_type))
    return model


def grouped_running_stats(model: nn.Module) -> list[torch.Tensor]:
    """The running statistics of the per-GPU-batch layers, which each process updates from its own first group."""
    return [t for m in model.modules() if isinstance(m, GroupedBatchNorm2d)
            for t in (m.running_mean, m.running_var) if t is not None]


MetricsLogger = Callable[[dict[str, float], int], None]
EvaluationHook = Callable[[int, float], Optional[str]]


def make_optimizer(model: nn.Module, plan: TrainPlan, fused: bool) -> torch.optim.SGD:
    """UP's SGD. Fused (a GPU's default, and the CPU's on request): one kernel for the update, and with fp16 the
    grad scaler hands it the inf check instead of reading it back to the host every step."""
    return torch.optim.SGD(model.parameters(), lr=plan.lr, momentum=plan.momentum, weight_decay=plan.weight_decay,
                           fused=fused or None)


class Trainer:
    """Trains `model` as `plan` says, computing as `compute` says (default: the device's way in the plan's
    precision). `plain` runs the same step the way the torchvision references do (fp32, NCHW, unfused SGD):
    `bench speed` compares the two."""

    def __init__(self, plan: TrainPlan, model: nn.Module, device: torch.device, world: World, *,
                 log_metrics: Optional[MetricsLogger] = None, checkpoint_dir: Optional[Path] = None,
                 progress: bool = True, extra_state: Optional[dict[str, Any]] = None, compile_model: bool = False,
                 plain: bool = False, compute: Optional[Compute] = None,
                 on_evaluation: Optional[EvaluationHook] = None):
        self.plan, self.device, self.world = plan, device, world
        if plain:
            compute = PLAIN
        elif compute is None:
            compute = resolve_compute(device.type, plan.precision)
        elif compute.precision != plan.precision:
            raise ValueError(f"compute in {compute.precision}, plan in {plan.precision}: the plan's precision is the "
                             "recipe's")
        self.compute = compute
        self.log_metrics = log_metrics or (lambda metrics, step: None)
        # Rank 0: told each evaluation's headline mIoU (iteration, mIoU); returns why to stop there, or None.
        self.on_evaluation = on_evaluation
        self._stop_behind: Optional[str] = None
        self.checkpoint_dir, self.progress = checkpoint_dir, progress
        self.extra_state = extra_state or {}  # saved with every checkpoint (the spec, the starting weights)
        model = convert_norm(model, world, device.type).to(device)
        set_norm_groups(model, plan.loss_group_images)
        self.channels_last = compute.channels_last
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        # Group 0 of the global batch is rank 0's: its statistics are UP's rank-0 running statistics, for all.
        self._rank0_stats = grouped_running_stats(model) if world.distributed else []
        self.model = model  # the unwrapped module: checkpoints, EMA and evaluation use this one
        self.forward_model: nn.Module = (
            DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
            if world.distributed else model
        )
        if compile_model:
            self.forward_model = torch.compile(self.forward_model)  # type: ignore[assignment]
        self.autocast_dtype = compute.autocast
        self.criterion = SegmentationLoss(plan.loss_spec(), group_images=plan.loss_group_images)
        # Loader batches are decoded uint8 frames; scale, flip, pad, crop and normalisation run here, on the device.
        self.transform = TrainTransform(size_pair(plan.crop_size), plan.pad_value, tuple(plan.mean), tuple(plan.std),
                                        channels_last=compute.channels_last)
        self.eval_transform = EvalTransform(size_pair(plan.test_size), tuple(plan.mean), tuple(plan.std),
                                            channels_last=compute.channels_last)
        self.optimizer = make_optimizer(model, plan, fused=compute.fused)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda it: learning_rate(it, plan) / plan.lr)
        self.scaler = torch.amp.GradScaler(device.type, enabled=compute.precision == "fp16")
        self.ema = ExpEMA(model, plan.ema_decay, plan.ema_ramp) if plan.ema else None
        self.iteration = 0
        self.best: Optional[Score] = None
        self.best_ema: Optional[Score] = None
        self.best_checkpoint: Optional[Path] = None
        self.last_checkpoint: Optional[Path] = None  # the newest checkpoint of this run
        self._saved_at: Optional[int] = None  # the iteration of the checkpoint this process last wrote
        self.history: list[dict] = []
        self._stop_signal: Optional[int] = None
        self._writing = False  # a checkpoint is being written: a second Ctrl-C waits for the file to be whole
        self._stop_now: Optional[int] = None
        self._loss_sum = torch.zeros((), device=device)
        self._first_bad = torch.zeros((), dtype=torch.long, device=device)
        self._synced_at = 0

    # --- state ---------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "iteration": self.iteration,
            "model": self.model.state_dict(),
            "ema": self.ema.module.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng_state(),
            "plan": asdict(self.plan),
            "best": asdict(self.best) if self.best else None,
            "best_ema": asdict(self.best_ema) if self.best_ema else None,
            **self.extra_state,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        if self.ema is not None:
            self.ema.module.load_state_dict(state["ema"])
        fused = [group.get("fused") for group in self.optimizer.param_groups]
        self.optimizer.load_state_dict(state["optimizer"])
        for group, flag in zip(self.optimizer.param_groups, fused):  # this device's kernel, not the saver's
            group["fused"] = flag
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.iteration = int(state["iteration"])
        self.best = Score(**state["best"]) if state.get("best") else None
        self.best_ema = Score(**state["best_ema"]) if state.get("best_ema") else None
        best_file = self.checkpoint_dir / checkpoint.BEST if self.checkpoint_dir else None
        self.best_checkpoint = best_file if best_file is not None and best_file.is_file() else None
        if self.checkpoint_dir is not None:
            self.last_checkpoint = next(iter(checkpoint.checkpoints(self.checkpoint_dir)), None)
        set_rng_state(state["rng"])

    def save_checkpoint(self) -> Optional[Path]:
        """Write this iteration's checkpoint (once: a second call at the same iteration returns the same file) and
        keep the plan's `keep_checkpoints` newest. Rank 0 writes; every rank waits so no one races ahead of a
        half-written file."""
        if self.checkpoint_dir is None:
            raise ValueError("this Trainer was built without a checkpoint folder")
        if self._saved_at == self.iteration:
            return self.last_checkpoint
        path = None
        if self.world.is_main:
            self._writing = True
            try:
                path = checkpoint.save(self.state_dict(), self.checkpoint_dir, self.iteration,
                                       keep=self.plan.keep_checkpoints)
            finally:
                self._writing = False
            self.last_checkpoint = path
        self._saved_at = self.iteration
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        self._stop_if_asked()
        return path

    def save_best(self) -> Optional[Path]:
        """best.pt: this iteration's checkpoint, linked (not written a second time)."""
        path = self.save_checkpoint()
        if path is None:  # not rank 0
            return None
        self._writing = True
        try:
            return checkpoint.mark_best(path)
        finally:
            self._writing = False
            self._stop_if_asked()

    # --- evaluation ----------------------------------------------------------------------------

    def evaluate(self, loader: DataLoader) -> dict[str, SegMetrics]:
        """Raw (and EMA) weights in one pass over the data: each rank scores its shard in the plan's test mode, and
        the confusion matrices are summed across ranks."""
        models = {"raw": self.model, **({"ema": self.ema.module} if self.ema is not None else {})}
        metrics = evaluate(models, loader, self.device, self.eval_transform,
                           mode=TestMode.from_plan(self.plan), precision=self.plan.precision,
                           reduce=all_reduce_sum, progress=self.progress and self.world.is_main,
                           desc="eval " + " and ".join(models))
        self.set_train_mode()
        return metrics

    def set_train_mode(self) -> None:
        self.forward_model.train()
        if self.plan.freeze_bn:
            for module in self.model.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()

    def run_evaluation(self, loader: DataLoader) -> tuple[SegMetrics, Optional[SegMetrics]]:
        """Score raw (and EMA) weights; keep the best as UP's auto_save_best did, on the weights UP evaluated
        (the EMA weights of an EMA row, the raw weights otherwise), in checkpoints/best.pt."""
        scored = self.evaluate(loader)
        metrics, ema_metrics = scored["raw"], scored.get("ema")
        # each curve names its weights (raw beside EMA): the headline `miou` is one of them
        logged = {val_curve("miou", "raw"): metrics.miou, val_curve("pixel_accuracy", "raw"): metrics.pixel_accuracy}
        if ema_metrics is not None:
            logged.update({val_curve("miou", "ema"): ema_metrics.miou,
                           val_curve("pixel_accuracy", "ema"): ema_metrics.pixel_accuracy})
        if self.world.is_main:
            self.log_metrics(logged, self.iteration)
        improved_raw = self.best is None or metrics.miou > self.best.miou
        if improved_raw:
            self.best = Score(metrics.miou, self.iteration)
        improved_ema = ema_metrics is not None and (self.best_ema is None or ema_metrics.miou > self.best_ema.miou)
        if ema_metrics is not None and improved_ema:
            self.best_ema = Score(ema_metrics.miou, self.iteration)
        if improved_ema if self.ema is not None else improved_raw:
            self.best_checkpoint = self.save_best()
        headline = ema_metrics.miou if ema_metrics is not None else metrics.miou
        stop = self.on_evaluation(self.iteration, headline) if self.on_evaluation and self.world.is_main else None
        self._stop_behind = broadcast_object(stop)  # every rank stops at the same evaluation
        return metrics, ema_metrics

    # --- training ------------------------------------------------------------------------------

    def _handle_signal(self, signum: int, frame: Optional[FrameType]) -> None:
        """The first signal asks for a checkpoint at the next log point, said at once; a second SIGINT (Ctrl-C
        again) stops now without one, once any checkpoint being written is whole. A SIGTERM never stops at once:
        torchrun and Slurm send it after (or besides) a SIGINT, and their stop must keep its checkpoint."""
        if self._stop_signal is None:
            self._stop_signal = signum
            if self.world.is_main:
                self._say(self._stop_message(signum))
            return
        if signum != signal.SIGINT:
            return
        if self._writing:
            self._stop_now = signum
            return
        raise Interrupted(signum, self.iteration, self.last_checkpoint, at_once=True)

    def _stop_if_asked(self) -> None:
        if self._stop_now is not None:
            raise Interrupted(self._stop_now, self.iteration, self.last_checkpoint, at_once=True)

    def _next_log_point(self) -> int:
        """The iteration of the next sync (`_fit`'s log, checkpoint and evaluation points), where a stop is taken."""
        plan = self.plan
        step = self.iteration if self._synced_at != self.iteration else self.iteration + 1
        while step < plan.iters and not (
                step % plan.log_every == 0 or (plan.checkpoint_every and step % plan.checkpoint_every == 0)
                or (plan.eval_every and step % plan.eval_every == 0)):
            step += 1
        return step

    def _stop_message(self, signum: int) -> str:
        if self.iteration >= self.plan.iters:
            what = "the training is done; the final evaluation and record follow"
        else:
            what = f"stopping at iteration {self._next_log_point()} (the next log point)"
        if signum == signal.SIGINT:
            return f"{what}; Ctrl-C again to stop now without a checkpoint"
        return f"{signal.Signals(signum).name}: {what}, with a checkpoint"

    @staticmethod
    def _say(line: str) -> None:
        # os.write, not print: a signal handler may interrupt a print to the same stream.
        try:
            os.write(sys.stderr.fileno(), (line + "\n").encode())
        except (OSError, ValueError):
            pass

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        """One optimizer step on a batch already on the device. Nothing here waits for the device: the loss and the
        divergence flag accumulate on it and are read at the next sync point (`_sync`)."""
        with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            loss = self.criterion(self.forward_model(images), labels)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.iteration += 1
        if self._rank0_stats:
            broadcast_tensors(self._rank0_stats)
        if self.ema is not None:
            self.ema.update(self.model, step=self.iteration - 1)
        loss = loss.detach().float()
        finite = torch.isfinite(loss)
        self._loss_sum += torch.where(finite, loss, torch.zeros_like(loss))
        first = ~finite & (self._first_bad == 0)
        self._first_bad = torch.where(first, torch.full_like(self._first_bad, self.iteration), self._first_bad)

    def _sync(self) -> tuple[float, bool]:
        """The one host synchronisation, at log, checkpoint and evaluation points (the same iterations on every
        rank): all-reduce [loss sum, first non-finite iteration, stop requested] and read them. The stop
        decision comes from the all-reduced flag alone, so every rank stops at the same iteration, whenever the
        signal arrived. Returns (mean loss since the last sync, stop)."""
        status = torch.stack([self._loss_sum, (self._first_bad > 0).float(),
                              torch.tensor(float(self._stop_signal is not None), device=self.device)])
        all_reduce_sum(status)
        loss_sum, diverged, stop = status.tolist()
        steps = max(1, self.iteration - self._synced_at)
        self._synced_at = self.iteration
        self._loss_sum.zero_()
        if diverged > 0:
            first = int(self._first_bad) or self.iteration  # this rank's first non-finite loss, else another's
            raise Diverged(
                f"loss is not finite at iteration {first}; training diverged "
                f"(lower train.lr_per_image; the global lr is {self.plan.lr}); the last good checkpoint is kept in "
                f"{self.checkpoint_dir}"
            )
        return loss_sum / self.world.size / steps, stop > 0

    def fit(self, loader: DataLoader, sampler: ShardedTrainSampler, val_loader: DataLoader) -> TrainResult:
        self.set_train_mode()
        previous = {s: signal.signal(s, self._handle_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            with logging_redirect_tqdm(loggers=[logging.getLogger("harness")]):  # notes above the progress bar
                return self._fit(loader, sampler, val_loader)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _fit(self, loader: DataLoader, sampler: ShardedTrainSampler, val_loader: DataLoader) -> TrainResult:
        plan = self.plan
        batches = endless_batches(loader, sampler, self.iteration)
        self._loss_sum.zero_()
        self._first_bad.zero_()
        self._synced_at = self.iteration
        show = self.progress and self.world.is_main
        # stdout redirected (a Slurm log, a file) or a terminal without a width: plain lines; else a progress bar.
        bar = show and bar_fits(sys.stdout) and bar_fits()
        log = TrainLog(plan.row, plan.iters, self.iteration, self.device, bar=bar, lines=show and not bar,
                       workers=plan.workers)
        window_images, window_start, data_wait = 0, time.perf_counter(), 0.0
        while self.iteration < plan.iters:
            fetch_start = time.perf_counter()
            raw = next(batches)
            data_wait += time.perf_counter() - fetch_start
            self.train_step(*self.transform(raw, self.device))
            log.advance()
            window_images += len(raw.images) * self.world.size
            step = self.iteration
            checkpoint_due = plan.checkpoint_every and step % plan.checkpoint_every == 0 and step != plan.iters
            eval_due = plan.eval_every and step % plan.eval_every == 0 and step != plan.iters
            if not (step % plan.log_every == 0 or step == plan.iters or checkpoint_due or eval_due):
                continue
            loss, stop = self._sync()
            elapsed = time.perf_counter() - window_start
            record = {"train_loss": loss, "lr": self.optimizer.param_groups[0]["lr"],
                      "images_per_s": window_images / max(elapsed, 1e-9),
                      "data_wait_fraction": data_wait / max(elapsed, 1e-9)}
            self.history.append({"step": step, **record})
            if self.world.is_main:
                self.log_metrics(record, step)
            log.report(step, record)
            window_images, window_start, data_wait = 0, time.perf_counter(), 0.0
            if stop:
                log.close()
                raise Interrupted(self._stop_signal or signal.SIGTERM, step, self.save_checkpoint())
            # Evaluate first: a checkpoint taken at the same iteration then holds that evaluation's best, and one
            # the evaluation wrote for best.pt is not written again.
            if eval_due:
                self.run_evaluation(val_loader)
                if self._stop_behind is not None:
                    log.close()
                    raise StoppedBehind(step, self.save_checkpoint(), self._stop_behind)
            if checkpoint_due:
                self.save_checkpoint()
        log.close()
        metrics, ema_metrics = self.run_evaluation(val_loader)
        final = self.save_checkpoint()
        return TrainResult(metrics, ema_metrics, final, self.best, self.best_ema, self.best_checkpoint, self.history)


DATA_BOUND = 0.2  # share of a log window spent waiting for the loader past which the log says so, once
# A run whose projected wall time passes SLOWER times its first estimate, and by SLOWER_BY_S at least (not a
# millisecond's noise), is "much slower": said once.
SLOWER, SLOWER_BY_S = 2.0, 30.0


class TrainLog:
    """What a person watching sees: a progress bar on a terminal, plain lines every log interval otherwise (a
    Slurm log, a file, a terminal without a width), with loss, lr, img/s, the share of time spent waiting for data,
    ETA and peak memory; an estimate of the whole run from this machine's measured rate after the first log windows,
    and a note when the run becomes much slower than that estimate."""

    def __init__(self, row: str, total: int, start: int, device: torch.device, bar: bool, lines: bool,
                 workers: int = 0, clock: Callable[[], float] = time.perf_counter):
        self.total, self.device, self.lines, self.workers, self.clock = total, device, lines, workers, clock
        self.started, self.start_step = clock(), start
        self.bar = tqdm(total=total, initial=start, desc=row, dynamic_ncols=True) if bar else None
        self.reports, self.said_data_bound, self.said_slower = 0, False, False
        self.first: Optional[tuple[int, float]] = None  # (step, time) of the first report: its window held start-up
        self.estimate: Optional[tuple[int, float]] = None  # (step it was made at, the whole run's seconds)

    def pace(self, step: int, now: float) -> None:
        """The whole run's wall time from the rate measured since the first report (the first window includes the
        loader workers' start and the first steps' warm-up, so it is left out); said once, and again only if the
        run becomes much slower than it."""
        if self.first is None:
            self.first = (step, now)
            return
        step0, time0 = self.first
        if step <= step0 or step >= self.total:
            return
        rate = (step - step0) / max(now - time0, 1e-9)  # iterations per second on this machine, now
        projected = (now - self.started) + (self.total - step) / rate
        if self.estimate is None:
            self.estimate = (step, projected)
            self.say(f"estimate: about {projected:.0f} s for this run's {self.total - self.start_step} iterations, "
                     f"from this machine's rate over iterations {step0}-{step} ({rate:.2f} it/s; evaluations and "
                     "checkpoints add to it)")
        elif (projected > SLOWER * self.estimate[1] and projected - self.estimate[1] >= SLOWER_BY_S
              and not self.said_slower):
            self.said_slower = True
            self.say(f"note: at iteration {step} the run is much slower than estimated: about {projected:.0f} s in "
                     f"all at its rate since iteration {step0} ({rate:.2f} it/s), against {self.estimate[1]:.0f} s "
                     f"estimated at iteration {self.estimate[0]}; the machine is busier than it was (other processes "
                     "on its cores) or throttled")

    def say(self, line: str) -> None:
        if self.bar is not None or self.lines:
            log.info(line)

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def report(self, step: int, record: dict[str, float]) -> None:
        self.reports += 1
        now = self.clock()
        self.pace(step, now)
        # The first window includes the workers' start; after it, waiting for data means decoding is the limit.
        if self.reports > 1 and record["data_wait_fraction"] > DATA_BOUND and not self.said_data_bound:
            self.said_data_bound = True
            note = (f"note: training waited for data {100 * record['data_wait_fraction']:.0f}% of the time up to "
                    f"iteration {step} ({record['images_per_s']:.1f} img/s, {self.workers} loader workers per "
                    "process): "
                    "decoding is the limit; give it more cores (train.workers) or read decoded frames with "
                    "--decoded-cache DIR (`bench data cache`)")
            self.say(note)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{record['train_loss']:.3f}", lr=f"{record['lr']:.2e}",
                                 img_s=f"{record['images_per_s']:.1f}")
        if self.lines:
            done = step - self.start_step
            eta = (now - self.started) / max(done, 1) * (self.total - step)
            print(f"iter {step}/{self.total} loss {record['train_loss']:.4f} lr {record['lr']:.3e} "
                  f"img/s {record['images_per_s']:.1f} data-wait {100 * record['data_wait_fraction']:.0f}% "
                  f"eta {format_duration(eta)} mem {peak_memory_gib(self.device):.2f}GiB", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def format_duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"
