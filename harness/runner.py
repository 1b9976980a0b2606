"""`bench run`: one row from spec to result record, MLflow run and regenerated table.

A run lives in runs/<dataset>/<row>/<stamp>/: `run.json` (its MLflow run and status) and
`checkpoints/`. Only rank 0 talks to MLflow and writes files; every rank trains.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import re
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from harness import checkpoint, distributed, paths, visualize
from harness.data.cityscapes import CLASS_NAMES, CityscapesTrain, Sample, check_pairs, check_root, find_samples
from harness.data.decoded import DecodedFrames, cached_or_built, open_cache
from harness.data.loaders import eval_loader, loader_workers, train_loader as train_data_loader
from harness.data.synthetic import ensure_synthetic
from harness.distributed import ShardedTrainSampler, World
from harness.errors import BenchError
from harness.finish import end_run, finish_run, run_tags, training_params
from harness.models import build_model, check_implemented
from harness.models.weights import apply_starting_weights
from harness.results import check_writable, git_commit, package_versions, utc_now
from harness.run_folder import RUN_FILE, RUN_STATUS, RunFolder, latest
from harness.spec import Spec, flatten, load_spec
from harness.table import measured_miou, write_benchmark
from harness.tracking import JOURNAL_DIR, Tracker
from harness.train import Interrupted, PRECISIONS, Trainer, TrainPlan, iterations_per_epoch

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
    compile: bool = False  # torch.compile the model (not part of the recipe: a resumed run may change it)
    decoded_cache: Optional[str] = None  # a folder of decoded frames (harness.data.decoded), built when missing
    offline_tracking: bool = False  # journal locally only; `bench sync` logs the run to MLflow later
    progress: bool = True


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def set_deterministic() -> None:
    """Deterministic kernels wherever PyTorch has them. Bilinear upsampling and adaptive average pooling have no
    deterministic CUDA backward, and every family uses one of them: those warn instead of stopping the run."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
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
            try:
                root = ensure_synthetic(paths.cache_dir(), seed=0, progress=options.progress)
            except OSError as exc:
                raise BenchError(f"cannot write the synthetic dataset under {paths.cache_dir()} ({exc.strerror or exc}); "
                                 "free space or make it writable, or set SEGBENCH_CACHE to another folder") from None
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
        workers=s.workers if synthetic else (t.workers if t.workers is not None else loader_workers(world.local_size)),
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


def find_resume_target(resume: str, row: str, dataset: str) -> tuple[RunFolder, dict[str, Any], Path]:
    """(run folder, checkpoint state, checkpoint path) for --resume [PATH]."""
    fix = "give a run folder (runs/<dataset>/<row>/<stamp>) or one of its checkpoints/ckpt-*.pt"
    state = None
    if resume == "latest":
        row_dir = paths.runs_dir() / dataset / row
        path = latest(row_dir)
        if path is None:
            raise BenchError(f"nothing to resume: no run of {row} on {dataset} under {row_dir}; start it without --resume")
        folder, which = RunFolder.open(path), f"the last run of {row} on {dataset} ({path})"
    else:
        target = Path(resume).expanduser()
        if not target.exists():
            raise BenchError(f"--resume {target} does not exist; {fix}")
        if target.is_dir():
            if not RunFolder.is_run_folder(target):
                raise BenchError(f"--resume {target} is not a segbench run folder (no {RUN_FILE}); {fix}")
            path = target
        else:
            try:
                state = checkpoint.load(target)
            except BenchError as exc:
                raise BenchError(f"--resume {target}: {exc}; {fix}") from None
            path = target.parent.parent
            if target.parent.name != "checkpoints" or not RunFolder.is_run_folder(path):
                raise BenchError(f"--resume {target} is a checkpoint outside a run folder (no {path / RUN_FILE}); "
                                 f"resume from the checkpoint inside its run folder, or start it with --init-checkpoint")
        folder, which = RunFolder.open(path), f"run {path}"
    if folder.status == RUN_STATUS["FINISHED"]:
        raise BenchError(f"nothing to resume: {which} already finished; start a new run without --resume")
    if folder.still_running():
        raise BenchError(f"{which} is still running; stop it before resuming it")
    if state is None:
        state, source = checkpoint.load_latest(folder.checkpoints)
        return folder, state, source
    return folder, state, Path(resume).expanduser()


MACHINE_FIELDS = ("plan.workers",)


def refuse_changed_recipe(state: dict[str, Any], spec: Spec, plan: TrainPlan, source: Path) -> None:
    saved = flatten({"spec": state["spec"], "plan": state["plan"]})
    current = flatten({"spec": spec.to_dict(), "plan": asdict(plan)})
    for machine_dependent in MACHINE_FIELDS:  # how many loader processes feed a run changes no sample or step
        saved.pop(machine_dependent, None)
        current.pop(machine_dependent, None)
    differing = sorted(k for k in saved.keys() | current.keys() if saved.get(k) != current.get(k))
    if differing:
        shown = ", ".join(f"{k} ({saved.get(k)!r} -> {current.get(k)!r})" for k in differing[:6])
        raise BenchError(f"cannot resume from {source}: the recipe changed: {shown}; resume with the same spec and options, or start a new run")


# --- the run ----------------------------------------------------------------------------------


SEED_MAX = 2**32 - 1  # numpy's seed range; torch and random accept it too
DEVICE_NAMES = re.compile(r"^(cpu|cuda(:\d+)?)$")


def check_options(options: RunOptions) -> None:
    """Command-line values that cannot run, refused before anything starts: one line naming the option,
    the value and what is accepted."""
    if not 0 <= options.seed <= SEED_MAX:
        raise BenchError(f"--seed {options.seed}: accepted 0 to {SEED_MAX}")
    if options.device is not None and not DEVICE_NAMES.match(options.device):
        raise BenchError(f"--device {options.device}: accepted cpu, cuda or cuda:N")
    if options.iters is not None and options.iters < 1:
        raise BenchError(f"--iters must be at least 1, got {options.iters}")
    if options.eval_every is not None and options.eval_every < 0:
        raise BenchError(f"--eval-every must be 0 (only at the end) or a positive number of iterations, got {options.eval_every}")
    if options.synthetic and options.data_root:
        raise BenchError("--synthetic and --data-root exclude each other; pass one")


def check_data_root(options: RunOptions) -> None:
    """A --data-root that is a file or missing, named before the launch (after the spec's own checks)."""
    root = None if options.synthetic else options.data_root or os.environ.get("CITYSCAPES_DATASET")
    if root:
        check_root(Path(root).expanduser())


def check_output_folders(options: RunOptions) -> None:
    """A read-only or missing-permission runs/ or results/ fails now, not after the training."""
    dataset = "synthetic" if options.synthetic else "cityscapes"
    check_writable(paths.runs_dir() / dataset, "run folder", "SEGBENCH_RUNS")
    check_writable(paths.results_dir() / dataset, "results folder", "SEGBENCH_RESULTS")


def check_batch_norm(spec: Spec, synthetic: bool, per_rank: int, processes: int, device_type: str) -> None:
    """One image per process: a batch norm after global pooling sees one value per channel, and training fails
    at its first step. A forward on the meta device (shapes only, no compute) finds such a layer up front.
    SyncBatchNorm (several processes on GPUs) normalises over all processes and needs no check."""
    if per_rank > 1 or spec.train.freeze_bn or (processes > 1 and device_type == "cuda"):
        return
    crop_key, crop = ("synthetic.crop_size", spec.synthetic.crop_size) if synthetic else ("train.crop_size", spec.train.crop_size)
    batch_key = "synthetic.batch_size" if synthetic else "columns.batch_size"
    single = []
    try:
        with torch.device("meta"):
            model = build_model(spec)
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.register_forward_pre_hook(
                    lambda m, args, name=name: single.append(name) if args[0].numel() == args[0].shape[1] else None)
        model.train()(torch.empty(1, 3, crop[1], crop[0], device="meta"))
    except Exception:  # the probe only looks for this one failure; the run itself reports anything else
        pass
    if single:
        raise BenchError(
            f"{spec.row}: 1 image per process ({batch_key} {planned_batch_size(spec, synthetic)} over {processes} "
            f"process(es)) at {crop_key} {crop}: batch norm {single[0]} would see one value per channel; use "
            f"fewer processes or a larger batch (or crop), or GPUs, whose SyncBatchNorm normalises over all processes")


def validate_launch(options: RunOptions, processes: int) -> Spec:
    """Checks that must fail before torchrun starts anything."""
    check_options(options)
    spec = load_spec(options.row)
    check_implemented(spec)
    check_data_root(options)
    per_rank = distributed.per_rank_batch(planned_batch_size(spec, options.synthetic), processes)
    device_type = (options.device or ("cuda" if torch.cuda.is_available() else "cpu")).split(":")[0]
    check_batch_norm(spec, options.synthetic, per_rank, processes, device_type)
    check_output_folders(options)
    return spec


def worker_argv(options: RunOptions, seeds: Sequence[int]) -> list[str]:
    """The `bench run` command line each torchrun worker runs, rebuilt from the parsed options (so a worker
    trains exactly what this process validated, whatever spelling the user typed)."""
    argv = ["run", "--row", options.row]
    for option in fields(RunOptions):
        value = getattr(options, option.name)
        if option.name in ("row", "seed", "progress") or value == option.default:
            continue
        flag = "--" + option.name.replace("_", "-")
        argv += [flag] if isinstance(value, bool) else [flag, str(value)]
    return argv + (["--seeds", ",".join(map(str, seeds))] if len(seeds) > 1 else ["--seed", str(seeds[0])])


def launch(options: RunOptions, seeds: Sequence[int], gpus: int, nnodes: int, node_rank: int,
           master_addr: Optional[str], master_port: Optional[int]) -> Optional[int]:
    """Start `gpus` torchrun workers on this node training `options` for each of `seeds`, and return their exit
    code; None when this process should train itself (one process, or already a torchrun worker)."""
    if gpus < 1 or nnodes < 1:
        raise BenchError(f"--gpus and --nnodes must be at least 1 (got {gpus}, {nnodes})")
    if (gpus == 1 and nnodes == 1) or "WORLD_SIZE" in os.environ:
        return None
    validate_launch(options, gpus * nnodes)
    if options.device != "cpu" and torch.cuda.device_count() < gpus:
        raise BenchError(f"--gpus {gpus}: this machine has {torch.cuda.device_count()} CUDA devices; "
                         "use fewer, or --device cpu to run the processes on the CPU (gloo)")
    return distributed.launch(worker_argv(options, seeds), gpus, nnodes, node_rank, master_addr, master_port)


# The options a resume takes from the run it continues unless given again (launcher and output options excluded).
RESUMED_OPTIONS = ("synthetic", "data_root", "iters", "seed", "tracking_uri", "precision", "deterministic",
                   "init_checkpoint", "eval_every", "offline_tracking", "decoded_cache")


def saved_options(options: RunOptions) -> dict[str, Any]:
    """What `bench run` was started with, kept in run.json so that a bare `--resume` needs nothing else."""
    return {name: getattr(options, name) for name in RESUMED_OPTIONS}


def with_saved_options(options: RunOptions) -> RunOptions:
    """For `--resume`: the options the resumed run was started with, except those given again on this command line
    (a changed recipe is then refused by the plan comparison, as before)."""
    if options.resume == "latest":
        pattern = f"*/{options.row}/*"
        if options.synthetic or options.data_root:  # the dataset is known: only its runs
            pattern = f"{'synthetic' if options.synthetic else 'cityscapes'}/{options.row}/*"
        path = latest(paths.runs_dir(), pattern)
    else:
        target = Path(options.resume).expanduser()
        path = target if target.is_dir() else target.parent.parent
    saved = RunFolder.open(path).info.get("options") or {} if path and RunFolder.is_run_folder(path) else {}
    defaults = RunOptions(row=options.row)
    merged = {name: saved[name] for name in RESUMED_OPTIONS
              if name in saved and getattr(options, name) == getattr(defaults, name)}
    return replace(options, **merged)


def run(options: RunOptions) -> dict[str, Any]:
    """Train and evaluate one row; returns the result record (on rank 0; other ranks get {})."""
    world = distributed.world_from_env()
    if options.resume:
        options = with_saved_options(options)
    check_options(options)
    spec = load_spec(options.row)
    check_implemented(spec)  # before any data is read
    check_data_root(options)
    if options.init_checkpoint:
        chosen = Path(options.init_checkpoint).expanduser().resolve()
        if not chosen.is_file():
            raise BenchError(f"--init-checkpoint {chosen} does not exist; give the path of a model checkpoint file")
        spec.model.init_checkpoint = str(chosen)
    device = pick_device(options.device, world)
    precision = resolve_precision(options.precision, device)
    per_rank = distributed.per_rank_batch(planned_batch_size(spec, options.synthetic), world.size)
    check_batch_norm(spec, options.synthetic, per_rank, world.size, device.type)
    if world.is_main:
        check_output_folders(options)
    if options.deterministic:
        set_deterministic()
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed crop sizes: let cuDNN pick its fastest kernels once
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
    check_pairs([*train_samples, *val_samples])  # headers only: sizes and label modes, before any training
    plan = make_plan(spec, dataset, len(train_samples), options, precision, world)

    resume_state = folder = None  # folder: the run's RunFolder, on rank 0
    if options.resume:
        folder, resume_state, source = find_resume_target(options.resume, spec.row, dataset)
        refuse_changed_recipe(resume_state, spec, plan, source)
        if world.is_main:
            print(f"resuming {spec.row} from {source} (iteration {resume_state['iteration']})", file=sys.stderr)
    # The store is checked before the data and the model are set up: a dead one costs seconds, not minutes.
    tracker = Tracker(options.tracking_uri or (folder and folder.info.get("tracking_uri"))
                      or paths.default_tracking_uri(), dataset, offline=options.offline_tracking) if world.is_main else None
    seed_everything(plan.seed)

    decoded_train = decoded_val = None
    if options.decoded_cache:
        decoded_train, decoded_val = open_decoded_cache(Path(options.decoded_cache), data_root, train_samples,
                                                        val_samples, world)
    sampler = ShardedTrainSampler(len(train_samples), per_rank, world, plan.seed)
    train_loader = train_data_loader(CityscapesTrain(train_samples, plan.crop_size, plan.scale_range, plan.flip,
                                                     decoded_train), sampler, per_rank, plan.workers, device, plan.seed)
    val_shard = distributed.shard(range(len(val_samples)), world)
    val_loader = eval_loader([val_samples[i] for i in val_shard], device, plan.workers, persistent=True,
                             decoded=decoded_val.subset(val_shard) if decoded_val is not None else None)
    model = build_model(spec)
    if resume_state is None:
        # Every rank loads the file; rank 0 alone says what it loaded or missed.
        with contextlib.nullcontext() if world.is_main else contextlib.redirect_stderr(io.StringIO()):
            starting = apply_starting_weights(model, spec, loud=dataset == "cityscapes")
    else:  # a resumed run takes every tensor from its checkpoint, and keeps the status it started with
        starting = resume_state.get("starting_weights", "unknown")

    commit = git_commit()
    run_id = None
    if world.is_main:
        if resume_state is not None:
            folder.claim()
            run_id = tracker.reopen(folder.path / JOURNAL_DIR, folder.info.get("mlflow_run_id"))
        else:
            folder = RunFolder.create(paths.runs_dir() / dataset / spec.row, row=spec.row, dataset=dataset,
                                      tracking_uri=tracker.tracking_uri, options=saved_options(options))
            try:
                run_id = tracker.start(folder.path / JOURNAL_DIR, spec.row, training_params(spec, plan, data_root,
                                       len(train_samples), device),
                                       run_tags(spec, dataset, commit, "train", "bench run", seed=plan.seed,
                                                starting_weights=starting))
            except BaseException:
                folder.end("FAILED")
                raise
            tracker.log_text(json.dumps(spec.to_dict(), indent=2), "spec.json")
        folder.update(mlflow_run_id=run_id, options=saved_options(options))
        print(f"segbench: {spec.row} on {dataset} ({data_root}); {world.size} process(es) on {device.type}, "
              f"{precision}; {plan.iters} iterations of batch {plan.batch_size}; run folder {folder.path}; "
              + (f"MLflow run {run_id} at {tracker.tracking_uri}" if run_id else
                 "tracking offline (journalled in the run folder; `bench sync` sends it to MLflow later)"),
              flush=True)
    checkpoints = Path(distributed.broadcast_object(str(folder.checkpoints) if folder else None))

    def log_metrics(metrics: dict[str, float], step: int) -> None:
        tracker.log_metrics(metrics, step)

    trainer = Trainer(spec, plan, model, device, world, log_metrics, checkpoints, options.progress,
                      extra_state={"starting_weights": starting}, compile_model=options.compile)
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
            end_run(folder, tracker, status)
    if not world.is_main:
        return {}
    try:
        panels = visualize.prediction_panels(
            trainer.ema.module if trainer.ema is not None else trainer.model, val_samples, spec, device,
            plan.test_size, plan.precision, tracker.artifact_path("panels/.keep").parent)
        record = _finish(spec, plan, dataset, world, device, tracker, run_id, commit, result, started, starting,
                         train_images=len(train_samples), val_images=len(val_samples), folder=folder,
                         panels=panels)
    except BaseException:
        end_run(folder, tracker, "FAILED")
        raise
    write_benchmark()
    return record


def _finish(spec, plan, dataset, world, device, tracker, run_id, commit, result, started, starting,
            train_images: Optional[int] = None, val_images: Optional[int] = None, *, folder: RunFolder,
            panels: list[Path]) -> dict[str, Any]:
    per_class = dict(zip(CLASS_NAMES, result.metrics.iou))
    ema_per_class = dict(zip(CLASS_NAMES, result.ema_metrics.iou)) if result.ema_metrics else None
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
        "iterations": plan.iters, "batch_size": plan.batch_size, "crop_size": plan.crop_size,
        # The table counts a run only on the official split sizes (harness.verdicts.classify).
        "train_images": train_images, "val_images": val_images, "devices": world.size,
        "device": device.type, "precision": plan.precision, "checkpoint": str(result.checkpoint),
        "wall_time_s": round(time.perf_counter() - started, 1), "git_commit": commit,
        "versions": package_versions(), "mlflow_run_id": run_id, "time": utc_now(),
    }
    ema = result.ema_metrics
    twins = {  # raw and EMA, final and best: the same names in every training run
        "final/miou": result.metrics.miou, "final/pixel_accuracy": result.metrics.pixel_accuracy,
        "final/miou_ema": ema.miou if ema else None, "final/pixel_accuracy_ema": ema.pixel_accuracy if ema else None,
        "best/miou": record["miou_best"], "best/iteration": record["best_iteration"],
        "best/miou_ema": record["miou_ema_best"], "best/iteration_ema": record["best_iteration_ema"],
    }
    return finish_run(spec, tracker, record, folder, headline=measured_miou(spec, record), metrics=twins,
                      step=plan.iters, per_class={"val_iou": per_class, "val_iou_ema": ema_per_class}, panels=panels)


def open_decoded_cache(cache_dir: Path, root: Path, train: list[Sample], val: list[Sample],
                       world: World) -> tuple[DecodedFrames, DecodedFrames]:
    """The decoded train and val frames in `cache_dir`: the first process of each node builds what is missing or
    stale (the folder may be node-local), the others wait for it, then every process maps the files."""
    cache_dir = cache_dir.expanduser()
    if world.local_rank == 0:
        for split, samples in (("train", train), ("val", val)):
            cached_or_built(cache_dir, root, split, samples, echo=lambda line: print(line, file=sys.stderr, flush=True))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    return open_cache(cache_dir, root, "train", train), open_cache(cache_dir, root, "val", val)


def exit_code_for(interrupt: Interrupted) -> int:
    return 128 + int(interrupt.signum) if interrupt.signum else 1

