"""`bench run`: one row from spec to result record, MLflow run and regenerated table.

A run lives in runs/<dataset>/<row>/<stamp>/: `run.json` (its MLflow run and status) and
`checkpoints/`. Only rank 0 talks to MLflow and writes files; every rank trains.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader

from harness import checkpoint, distributed, paths
from harness.data.cityscapes import CLASS_NAMES, CityscapesEval, CityscapesTrain, find_samples
from harness.data.synthetic import ensure_synthetic
from harness.distributed import ShardedTrainSampler, World
from harness.errors import BenchError
from harness.models import build_model, check_implemented
from harness.models.weights import apply_starting_weights
from harness.results import git_commit, package_versions, utc_now, write_record
from harness.spec import Spec, flatten, load_spec
from harness.table import write_benchmark
from harness.tracking import Tracker
from harness.train import Interrupted, PRECISIONS, Trainer, TrainPlan, iterations_per_epoch

RUN_FILE = "run.json"
UP_GPUS = 8  # every United-Perception row trained on 8 GPUs (pt_sync_bn group_size 8)


@dataclass
class RunOptions:
    row: str
    synthetic: bool = False
    data_root: Optional[str] = None
    iters: Optional[int] = None
    seed: int = 0
    tracking_uri: Optional[str] = None
    device: Optional[str] = None
    precision: Optional[str] = None
    resume: Optional[str] = None  # "latest", a run folder, or a checkpoint file
    deterministic: bool = False
    init_checkpoint: Optional[str] = None
    eval_every: Optional[int] = None  # iterations; overrides the recipe's cadence
    progress: bool = True


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def set_deterministic() -> None:
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False


def planned_batch_size(spec: Spec, synthetic: bool) -> int:
    return spec.synthetic.batch_size if synthetic else spec.columns.batch_size


def resolve_data_root(options: RunOptions, world: World) -> tuple[Path, str]:
    """The dataset folder and its name ('synthetic' or 'cityscapes')."""
    if options.synthetic:
        if options.data_root:
            raise BenchError("--synthetic and --data-root exclude each other; pass one")
        root = None
        if world.is_main:  # one writer; the others wait for the finished folder
            root = ensure_synthetic(paths.cache_dir(), seed=0, progress=options.progress)
        return Path(distributed.broadcast_object(str(root))), "synthetic"
    root = options.data_root or os.environ.get("CITYSCAPES_DATASET")
    if not root:
        raise BenchError("no dataset given: pass --data-root DIR (or set CITYSCAPES_DATASET), or --synthetic for the synthetic dataset")
    return Path(root).expanduser(), "cityscapes"


def make_plan(spec: Spec, dataset: str, train_images: int, options: RunOptions, precision: str,
              world: World) -> TrainPlan:
    """The one recipe object the run trains with: the spec's UP recipe on Cityscapes, or its synthetic budget
    (same recipe, CPU-sized iterations, batch, crops, lr and EMA ramp), plus the command line's overrides."""
    t, s = spec.train, spec.synthetic
    synthetic = dataset == "synthetic"
    batch_size = s.batch_size if synthetic else spec.columns.batch_size
    per_epoch = iterations_per_epoch(train_images, batch_size)
    plan = TrainPlan(
        iters=s.iters if synthetic else spec.columns.epochs * per_epoch,
        iters_per_epoch=per_epoch, batch_size=batch_size,
        crop_size=s.crop_size if synthetic else t.crop_size,
        test_size=s.test_size if synthetic else spec.columns.test_size,
        scale_range=s.scale_range if synthetic else t.scale_range,
        flip=t.flip, pad_value=t.pad_value, mean=spec.data.mean, std=spec.data.std,
        lr=s.lr if synthetic else t.lr_per_image * batch_size,
        momentum=t.momentum, weight_decay=t.weight_decay,
        warmup_iters=s.warmup_iters if synthetic else t.warmup_iters, warmup_ratio=t.warmup_ratio,
        poly_power=t.poly_power, min_lr=t.min_lr,
        ema=spec.columns.ema, ema_decay=s.ema_decay if synthetic else t.ema_decay,
        ema_ramp=s.ema_ramp if synthetic else t.ema_ramp,
        loss=spec.loss.name, ohem_thresh=spec.loss.ohem_thresh,
        ohem_min_kept=s.ohem_min_kept if synthetic else spec.loss.ohem_min_kept,
        aux_weights=spec.loss.aux_weights,
        # UP trained every row on 8 GPUs; the synthetic batch keeps two groups so 1 and 2 processes agree.
        loss_group_images=max(1, batch_size // (2 if synthetic else UP_GPUS)),
        freeze_bn=t.freeze_bn,
        eval_every=s.eval_every if synthetic else t.eval_every_epochs * per_epoch,
        log_every=s.log_every if synthetic else t.log_every,
        checkpoint_every=s.checkpoint_every if synthetic else t.checkpoint_every,
        workers=s.workers if synthetic else t.workers,
    )
    if options.iters is not None:
        if options.iters < 1:
            raise BenchError(f"--iters must be at least 1, got {options.iters}")
        plan.iters = options.iters
        plan.warmup_iters = min(plan.warmup_iters, plan.iters)
    if options.eval_every is not None:
        if options.eval_every < 0:
            raise BenchError(f"--eval-every must be 0 (only at the end) or a positive number of iterations, got {options.eval_every}")
        plan.eval_every = options.eval_every
    plan.seed, plan.precision, plan.world_size = options.seed, precision, world.size
    plan.log_every = max(1, min(plan.log_every, plan.iters))
    return plan


def pick_device(name: Optional[str], world: World) -> torch.device:
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise BenchError(f"--device {name}: no CUDA device is available; use --device cpu")
        if world.distributed or name == "cuda":
            return torch.device("cuda", world.local_rank)
    return torch.device(name)


def resolve_precision(requested: Optional[str], device: torch.device) -> str:
    if requested is None:
        return "bf16" if device.type == "cuda" else "fp32"
    if requested not in PRECISIONS:
        raise BenchError(f"--precision {requested}: use one of {', '.join(PRECISIONS)}")
    if device.type == "cpu" and requested != "fp32":
        raise BenchError(f"--precision {requested} needs a GPU; CPU runs train in fp32")
    return requested


# --- run folders and resume -----------------------------------------------------------------------


def _write_run_file(run_dir: Path, info: dict[str, Any]) -> None:
    tmp = run_dir / f".{RUN_FILE}.tmp"
    tmp.write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    tmp.replace(run_dir / RUN_FILE)


def _read_run_file(run_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((run_dir / RUN_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        raise BenchError(f"{run_dir} is not a segbench run folder (no readable {RUN_FILE})") from None


def find_resume_target(resume: str, row: str, dataset: str) -> tuple[Path, dict[str, Any], Path]:
    """(run folder, checkpoint state, checkpoint path) for --resume [PATH]."""
    if resume == "latest":
        row_dir = paths.runs_dir() / dataset / row
        runs = sorted(p for p in row_dir.glob("*") if (p / RUN_FILE).is_file())
        if not runs:
            raise BenchError(f"nothing to resume: no run of {row} on {dataset} under {row_dir}; start it without --resume")
        run_dir = runs[-1]
        if _read_run_file(run_dir).get("status") == "finished":
            raise BenchError(f"nothing to resume: the last run of {row} on {dataset} ({run_dir}) finished; start a new run without --resume")
        state, path = checkpoint.load_latest(run_dir / "checkpoints")
        return run_dir, state, path
    target = Path(resume).expanduser()
    run_dir = target if target.is_dir() else target.parent.parent
    if _read_run_file(run_dir).get("status") == "finished":
        raise BenchError(f"run {run_dir} already finished; start a new run without --resume")
    if target.is_dir():
        state, path = checkpoint.load_latest(target / "checkpoints")
        return target, state, path
    return run_dir, checkpoint.load(target), target


def refuse_changed_recipe(state: dict[str, Any], spec: Spec, plan: TrainPlan, source: Path) -> None:
    saved = flatten({"spec": state["spec"], "plan": state["plan"]})
    current = flatten({"spec": spec.to_dict(), "plan": asdict(plan)})
    differing = sorted(k for k in saved.keys() | current.keys() if saved.get(k) != current.get(k))
    if differing:
        shown = ", ".join(f"{k} ({saved.get(k)!r} -> {current.get(k)!r})" for k in differing[:6])
        raise BenchError(f"cannot resume from {source}: the recipe changed: {shown}; resume with the same spec and options, or start a new run")


# --- the run ----------------------------------------------------------------------------------


def validate_launch(options: RunOptions, processes: int) -> Spec:
    """Checks that must fail before torchrun starts anything."""
    spec = load_spec(options.row)
    check_implemented(spec)
    distributed.per_rank_batch(planned_batch_size(spec, options.synthetic), processes)
    return spec


def launch(options: RunOptions, worker_argv: list[str], gpus: int, nnodes: int, node_rank: int,
           master_addr: Optional[str], master_port: Optional[int]) -> Optional[int]:
    """Start `gpus` torchrun workers on this node running `worker_argv` and return their exit code;
    None when this process should train itself (one process, or already a torchrun worker)."""
    if gpus < 1 or nnodes < 1:
        raise BenchError(f"--gpus and --nnodes must be at least 1 (got {gpus}, {nnodes})")
    if (gpus == 1 and nnodes == 1) or "WORLD_SIZE" in os.environ:
        return None
    validate_launch(options, gpus * nnodes)
    if options.device != "cpu" and torch.cuda.device_count() < gpus:
        raise BenchError(f"--gpus {gpus}: this machine has {torch.cuda.device_count()} CUDA devices; "
                         "use fewer, or --device cpu to run the processes on the CPU (gloo)")
    return distributed.launch(worker_argv, gpus, nnodes, node_rank, master_addr, master_port)


def run(options: RunOptions) -> dict[str, Any]:
    """Train and evaluate one row; returns the result record (on rank 0; other ranks get {})."""
    world = distributed.world_from_env()
    spec = load_spec(options.row)
    check_implemented(spec)  # before any data is read
    if options.init_checkpoint:
        chosen = Path(options.init_checkpoint).expanduser().resolve()
        if not chosen.is_file():
            raise BenchError(f"--init-checkpoint {chosen} does not exist; give the path of a model checkpoint file")
        spec.model.init_checkpoint = str(chosen)
    device = pick_device(options.device, world)
    precision = resolve_precision(options.precision, device)
    per_rank = distributed.per_rank_batch(planned_batch_size(spec, options.synthetic), world.size)
    if options.deterministic:
        set_deterministic()
    distributed.init(world, device.type)
    try:
        return _run(options, spec, world, device, precision, per_rank)
    finally:
        distributed.shutdown()


def _run(options: RunOptions, spec: Spec, world: World, device: torch.device, precision: str,
         per_rank: int) -> dict[str, Any]:
    data_root, dataset = resolve_data_root(options, world)
    train_samples = find_samples(data_root, "train")
    val_samples = find_samples(data_root, "val")
    plan = make_plan(spec, dataset, len(train_samples), options, precision, world)

    resume_state = run_dir = None
    if options.resume:
        run_dir, resume_state, source = find_resume_target(options.resume, spec.row, dataset)
        refuse_changed_recipe(resume_state, spec, plan, source)
        if world.is_main:
            print(f"resuming {spec.row} from {source} (iteration {resume_state['iteration']})", file=sys.stderr)
    seed_everything(plan.seed)

    sampler = ShardedTrainSampler(len(train_samples), per_rank, world, plan.seed)
    train_loader = DataLoader(
        CityscapesTrain(train_samples, plan.crop_size, plan.scale_range, plan.flip, plan.pad_value, plan.mean, plan.std),
        batch_size=per_rank, sampler=sampler,
        drop_last=True, num_workers=plan.workers, pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(plan.seed))  # keeps the global RNG untouched by the loader
    val_loader = DataLoader(CityscapesEval(distributed.shard(val_samples, world), plan.test_size, plan.mean, plan.std),
                            batch_size=1, num_workers=min(plan.workers, 2))
    model = build_model(spec)
    if resume_state is None:
        starting = apply_starting_weights(model, spec, loud=dataset == "cityscapes")
    else:  # a resumed run takes every tensor from its checkpoint, and keeps the status it started with
        starting = resume_state.get("starting_weights", "unknown")

    tracker = Tracker(options.tracking_uri or (run_dir and _read_run_file(run_dir).get("tracking_uri"))
                      or paths.default_tracking_uri(), dataset) if world.is_main else None
    commit = git_commit()
    run_id = None
    if world.is_main:
        if resume_state is not None:
            run_id = _read_run_file(run_dir)["mlflow_run_id"]
            tracker.reopen(run_id)
        else:
            run_dir = paths.runs_dir() / dataset / spec.row / time.strftime("%Y%m%d-%H%M%S")
            while run_dir.exists():
                run_dir = run_dir.with_name(run_dir.name + "+")
            run_dir.mkdir(parents=True)
            tags = {"row": spec.row, "dataset": dataset, "git_commit": commit,
                    "reference_miou": " | ".join(repr(v) for v in spec.reference.miou),
                    "reference_source": spec.reference.source, "starting_weights": starting}
            params = {**spec.flat(), **{f"plan.{k}": v for k, v in asdict(plan).items()},
                      "data.root": str(data_root), "data.train_images": len(train_samples), "device": device.type}
            run_id = tracker.start(spec.row, params, tags)
            tracker.log_text(json.dumps(spec.to_dict(), indent=2), "spec.json")
        _write_run_file(run_dir, {"row": spec.row, "dataset": dataset, "mlflow_run_id": run_id,
                                  "tracking_uri": tracker.tracking_uri, "status": "running"})
    run_dir = Path(distributed.broadcast_object(str(run_dir)))

    def log_metrics(metrics: dict[str, float], step: int) -> None:
        tracker.log_metrics(metrics, step)

    trainer = Trainer(spec, plan, model, device, world, log_metrics, run_dir / "checkpoints", options.progress,
                      extra_state={"starting_weights": starting})
    if resume_state is not None:
        trainer.load_state_dict(resume_state)

    started = time.perf_counter()
    status = "FAILED"
    try:
        result = trainer.fit(train_loader, sampler, val_loader)
        status = "FINISHED"
    except Interrupted:
        status = "KILLED"
        raise
    finally:
        if world.is_main and status != "FINISHED":
            tracker.finish(status)
            _write_run_file(run_dir, {**_read_run_file(run_dir), "status": "interrupted" if status == "KILLED" else "failed"})
    if not world.is_main:
        return {}
    try:
        record = _finish(spec, plan, dataset, world, device, tracker, run_id, commit, result, started, starting)
    except BaseException:
        tracker.finish("FAILED")
        raise
    _write_run_file(run_dir, {**_read_run_file(run_dir), "status": "finished"})
    write_benchmark()
    return record


def _finish(spec, plan, dataset, world, device, tracker, run_id, commit, result, started, starting) -> dict[str, Any]:
    per_class = dict(zip(CLASS_NAMES, result.metrics.iou))
    ema_per_class = dict(zip(CLASS_NAMES, result.ema_metrics.iou)) if result.ema_metrics else None
    tracker.log_metrics({f"iou_{name.replace(' ', '_')}": v for name, v in per_class.items()}, plan.iters)
    tracker.log_text(per_class_csv(per_class, ema_per_class), "per_class_iou.csv")
    record = {
        "kind": "train", "row": spec.row, "dataset": dataset, "seed": plan.seed,
        "miou": result.metrics.miou, "pixel_accuracy": result.metrics.pixel_accuracy,
        "miou_ema": result.ema_metrics.miou if result.ema_metrics else None,
        # UP evaluated every 5 epochs and kept the best (auto_save_best): the table reports the best, the
        # record keeps both so nothing is hidden.
        "miou_best": result.best.miou, "best_iteration": result.best.iteration,
        "miou_ema_best": result.best_ema.miou if result.best_ema else None,
        "best_iteration_ema": result.best_ema.iteration if result.best_ema else None,
        "best_checkpoint": str(result.best_checkpoint) if result.best_checkpoint else None,
        "starting_weights": starting,
        "per_class_iou": per_class, "per_class_iou_ema": ema_per_class,
        "iterations": plan.iters, "batch_size": plan.batch_size, "devices": world.size,
        "device": device.type, "precision": plan.precision, "checkpoint": str(result.checkpoint),
        "wall_time_s": round(time.perf_counter() - started, 1), "git_commit": commit,
        "versions": package_versions(), "mlflow_run_id": run_id, "time": utc_now(),
    }
    path = write_record(record)
    tracker.set_tag("result_record", str(path))
    tracker.finish("FINISHED")
    record["_path"] = str(path)
    return record


def per_class_csv(per_class: dict[str, float], ema: Optional[dict[str, float]]) -> str:
    lines = ["class,iou" + (",iou_ema" if ema else "")]
    for name, value in per_class.items():
        lines.append(f"{name},{value:.4f}" + (f",{ema[name]:.4f}" if ema else ""))
    return "\n".join(lines) + "\n"


def exit_code_for(interrupt: Interrupted) -> int:
    return 128 + int(interrupt.signum) if interrupt.signum else 1

