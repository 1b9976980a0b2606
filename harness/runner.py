"""`bench run`: one row from spec to result record, MLflow run and regenerated table."""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch.utils.data import DataLoader

from harness import paths
from harness.data.cityscapes import CLASS_NAMES, CityscapesEval, CityscapesTrain, find_samples
from harness.data.synthetic import ensure_synthetic
from harness.errors import BenchError
from harness.models import build_model, check_implemented
from harness.results import git_commit, package_versions, utc_now, write_record
from harness.spec import Spec, load_spec
from harness.table import write_benchmark
from harness.tracking import Tracker
from harness.train import TrainPlan, fit, iterations_for


@dataclass
class RunOptions:
    row: str
    synthetic: bool = False
    data_root: Optional[str] = None
    iters: Optional[int] = None
    seed: int = 0
    tracking_uri: Optional[str] = None
    device: Optional[str] = None
    progress: bool = True


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_data_root(options: RunOptions) -> tuple[Path, str]:
    """The dataset folder and its name ('synthetic' or 'cityscapes')."""
    if options.synthetic:
        if options.data_root:
            raise BenchError("--synthetic and --data-root exclude each other; pass one")
        return ensure_synthetic(paths.cache_dir(), seed=0, progress=options.progress), "synthetic"
    root = options.data_root or os.environ.get("CITYSCAPES_DATASET")
    if not root:
        raise BenchError("no dataset given: pass --data-root DIR (or set CITYSCAPES_DATASET), or --synthetic for the synthetic dataset")
    return Path(root).expanduser(), "cityscapes"


def make_plan(spec: Spec, dataset: str, train_images: int, options: RunOptions) -> TrainPlan:
    if dataset == "synthetic":
        s = spec.synthetic
        plan = TrainPlan(iters=s.iters, batch_size=s.batch_size, crop_size=s.crop_size, test_size=s.test_size,
                         scale_range=s.scale_range, lr=s.lr, ema_decay=s.ema_decay, ema_warmup=s.ema_warmup, log_every=s.log_every,
                         eval_every=s.eval_every, ohem_min_kept=s.ohem_min_kept, workers=s.workers)
    else:
        t = spec.train
        plan = TrainPlan(iters=iterations_for(spec.columns.epochs, train_images, spec.columns.batch_size),
                         batch_size=spec.columns.batch_size, crop_size=t.crop_size, test_size=spec.columns.test_size,
                         scale_range=t.scale_range, lr=t.lr, ema_decay=t.ema_decay, ema_warmup=t.ema_warmup, log_every=t.log_every,
                         eval_every=t.eval_every, ohem_min_kept=spec.loss.ohem_min_kept, workers=t.workers)
    if options.iters is not None:
        if options.iters < 1:
            raise BenchError(f"--iters must be at least 1, got {options.iters}")
        plan.iters = options.iters
    plan.seed = options.seed
    plan.log_every = max(1, min(plan.log_every, plan.iters))
    return plan


def pick_device(name: Optional[str]) -> torch.device:
    if name:
        if name.startswith("cuda") and not torch.cuda.is_available():
            raise BenchError(f"--device {name}: no CUDA device is available; use --device cpu")
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def run(options: RunOptions) -> dict:
    """Train and evaluate one row; returns the result record."""
    spec = load_spec(options.row)
    check_implemented(spec)  # before any data is read
    device = pick_device(options.device)
    data_root, dataset = resolve_data_root(options)
    train_samples = find_samples(data_root, "train")
    val_samples = find_samples(data_root, "val")
    plan = make_plan(spec, dataset, len(train_samples), options)
    seed_everything(plan.seed)

    generator = torch.Generator().manual_seed(plan.seed)
    train_loader = DataLoader(
        CityscapesTrain(train_samples, plan.crop_size, plan.scale_range), batch_size=plan.batch_size,
        shuffle=True, drop_last=len(train_samples) >= plan.batch_size, num_workers=plan.workers,
        generator=generator, pin_memory=device.type == "cuda", persistent_workers=plan.workers > 0)
    val_loader = DataLoader(CityscapesEval(val_samples, plan.test_size), batch_size=1, num_workers=plan.workers)
    model = build_model(spec)

    tracker = Tracker(options.tracking_uri or paths.default_tracking_uri(), dataset)
    commit = git_commit()
    tags = {"row": spec.row, "dataset": dataset, "git_commit": commit,
            "reference_miou": " | ".join(repr(v) for v in spec.reference.miou),
            "reference_source": spec.reference.source}
    params = {**spec.flat(), **{f"plan.{k}": v for k, v in asdict(plan).items()},
              "data.root": str(data_root), "data.train_images": len(train_samples), "device": str(device)}
    run_id = tracker.start(spec.row, params, tags)
    tracker.log_text(json.dumps(spec.to_dict(), indent=2), "spec.json")
    started = time.perf_counter()
    try:
        result = fit(spec, plan, model, train_loader, val_loader, device, tracker.log_metrics, options.progress)
        per_class = {name: iou for name, iou in zip(CLASS_NAMES, result.metrics.iou)}
        ema_per_class = ({name: iou for name, iou in zip(CLASS_NAMES, result.ema_metrics.iou)}
                         if result.ema_metrics else None)
        tracker.log_metrics({f"iou_{name.replace(' ', '_')}": v for name, v in per_class.items()}, plan.iters)
        tracker.log_text(_per_class_csv(per_class, ema_per_class), "per_class_iou.csv")
        record = {
            "row": spec.row, "dataset": dataset, "seed": plan.seed,
            "miou": result.metrics.miou, "pixel_accuracy": result.metrics.pixel_accuracy,
            "miou_ema": result.ema_metrics.miou if result.ema_metrics else None,
            "per_class_iou": per_class, "per_class_iou_ema": ema_per_class,
            "iterations": plan.iters, "batch_size": plan.batch_size, "devices": 1, "device": str(device),
            "wall_time_s": round(time.perf_counter() - started, 1), "git_commit": commit,
            "versions": package_versions(), "mlflow_run_id": run_id, "time": utc_now(),
        }
        path = write_record(record)
        tracker.set_tag("result_record", str(path))
        tracker.finish("FINISHED")
    except BaseException:
        tracker.finish("FAILED")
        raise
    write_benchmark()
    record["_path"] = str(path)
    return record


def _per_class_csv(per_class: dict[str, float], ema: Optional[dict[str, float]]) -> str:
    lines = ["class,iou" + (",iou_ema" if ema else "")]
    for name, value in per_class.items():
        lines.append(f"{name},{value:.4f}" + (f",{ema[name]:.4f}" if ema else ""))
    return "\n".join(lines) + "\n"
