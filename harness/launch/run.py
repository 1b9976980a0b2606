"""`bench run`: one row from spec to result record, tracked run and regenerated table.

A run lives in runs/<dataset>/<row>/<stamp>/: `run.json` (its tracked run and status), `checkpoints/` and
`tracking/` (its journal). Only rank 0 talks to the tracking store and writes files; every rank trains.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Optional

import torch
from torch.utils.data import DataLoader

from harness import paths
from harness.config.benchmark import BEHIND_MARGIN, REFERENCE_DATASET
from harness.config.curves import BEHIND_MIOU
from harness.config.plan import MACHINE_FIELDS, TrainPlan, make_plan
from harness.config.spec import Spec, flatten, training_row
from harness.cores import intra_op_threads, loader_workers
from harness.data.cityscapes import CityscapesTrain, Sample, check_pairs, find_samples, split_digest
from harness.data.decoded import DecodedFrames, cached_or_built, open_cache
from harness.data.loaders import eval_loader, train_loader
from harness.data.source import cityscapes_root, synthetic_root
from harness.engine import checkpoint, distributed
from harness.engine.device import pick_device, seed_everything, set_deterministic
from harness.engine.distributed import ShardedTrainSampler, World, world_from_env
from harness.engine.run_folder import RUN_FILE, RUN_STATUS, STOPPED_BEHIND, RunFolder, disk_usage, latest
from harness.engine.train import Interrupted, StoppedBehind, Trainer, TrainResult
from harness.errors import BenchError
from harness.files import format_bytes
from harness.launch.options import CheckedRun, LaunchOptions, RunOptions, validate_run, worker_argv
from harness.models import build_model
from harness.models.weights import apply_starting_weights
from harness.outputs.panels import prediction_panels
from harness.report.behind import EarlyWarning
from harness.report.finish import TrainingOutcome, end_run, finish_training, run_tags, training_params
from harness.report.records import TrainRecord, git_commit
from harness.report.table import random_start, write_benchmark
from harness.tracking.journal import JOURNAL_DIR
from harness.tracking.system_metrics import SystemMetrics, next_step
from harness.tracking.tracker import Tracker

log = logging.getLogger(__name__)

# Spec and plan keys a resume may change: machine-dependent or disk policy, never a sample or a step.
# (spec.synthetic.expected_s: older runs' specs carry it.)
NOT_RECIPE = ({f"plan.{name}" for name in (*MACHINE_FIELDS, "keep_checkpoints")}
              | {"spec.train.keep_checkpoints", "spec.synthetic.keep_checkpoints", "spec.synthetic.expected_s"})


# --- resume ---------------------------------------------------------------------------------------


def find_resume_target(resume: str, row: str, dataset: str) -> tuple[RunFolder, dict[str, Any], Path]:
    """(run folder, checkpoint state, checkpoint path) for --resume [PATH]."""
    fix = "give a run folder (runs/<dataset>/<row>/<stamp>) or one of its checkpoints/ckpt-*.pt"
    state = None
    if resume == "latest":
        row_dir = paths.runs_dir() / dataset / row
        path = latest(row_dir)
        if path is None:
            raise BenchError(f"nothing to resume: no run of {row} on {dataset} under {row_dir}; start it without "
                             "--resume")
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
                                 "resume from the checkpoint inside its run folder, or start it with --init-checkpoint")
        folder, which = RunFolder.open(path), f"run {path}"
    if folder.status == RUN_STATUS["FINISHED"]:
        raise BenchError(f"nothing to resume: {which} already finished; start a new run without --resume")
    if folder.still_running():
        raise BenchError(f"{which} is still running; stop it before resuming it")
    if state is None:
        state, source = checkpoint.load_latest(folder.checkpoints)
        return folder, state, source
    return folder, state, Path(resume).expanduser()


def refuse_changed_recipe(state: dict[str, Any], spec: Spec, plan: TrainPlan, source: Path) -> None:
    saved = flatten({"spec": state["spec"], "plan": state["plan"]})
    current = flatten({"spec": spec.to_dict(), "plan": asdict(plan)})
    differing = sorted(k for k in saved.keys() | current.keys()
                       if k not in NOT_RECIPE and saved.get(k) != current.get(k))
    if differing:
        shown = ", ".join(f"{k} ({saved.get(k)!r} -> {current.get(k)!r})" for k in differing[:6])
        raise BenchError(f"cannot resume from {source}: the recipe changed: {shown}; resume with the same spec and "
                         "options, or start a new run")


# The options a resume takes from the run it continues unless given again (launcher and output options excluded).
RESUMED_OPTIONS = ("synthetic", "data_root", "iters", "seed", "tracking_uri", "precision", "deterministic",
                   "init_checkpoint", "eval_every", "offline_tracking", "decoded_cache", "channels_last", "fused")


def saved_options(options: RunOptions) -> dict[str, Any]:
    """What `bench run` was started with, kept in run.json so that a bare `--resume` needs nothing else."""
    return {name: getattr(options, name) for name in RESUMED_OPTIONS}


def with_saved_options(options: RunOptions) -> RunOptions:
    """For `--resume`: the options the resumed run was started with, except those given again on this command line
    (a changed recipe is then refused by the plan comparison)."""
    assert options.resume is not None
    if options.resume == "latest":
        pattern = f"*/{options.row}/*"
        if options.synthetic or options.data_root:  # the dataset is known: only its runs
            pattern = f"{options.dataset}/{options.row}/*"
        path = latest(paths.runs_dir(), pattern)
    else:
        target = Path(options.resume).expanduser()
        path = target if target.is_dir() else target.parent.parent
    saved = (RunFolder.open(path).info.get("options") or {}) if path and RunFolder.is_run_folder(path) else {}
    defaults = RunOptions(row=options.row)
    merged = {name: saved[name] for name in RESUMED_OPTIONS
              if name in saved and getattr(options, name) == getattr(defaults, name)}
    return replace(options, **merged)


# --- one training ------------------------------------------------------------------------------


@dataclass
class Data:
    root: Path
    dataset: str
    train: list[Sample]
    val: list[Sample]

    @functools.cached_property
    def digests(self) -> dict[str, str]:
        """Each split's digest (its files' paths and sizes): in MLflow's dataset inputs and the record."""
        return {"train": split_digest(self.root, self.train), "val": split_digest(self.root, self.val)}


def find_data(checked: CheckedRun, world: World) -> Data:
    """The dataset's train and val samples, their headers checked before any training. The synthetic dataset is
    generated by rank 0 while the others wait."""
    options = checked.options
    if options.synthetic:
        root = synthetic_root(options.progress) if world.is_main else None
        root = Path(distributed.broadcast_object(str(root)))
    else:
        root = cityscapes_root(options.data_root)
    train, val = find_samples(root, "train"), find_samples(root, "val")
    check_pairs([*train, *val])  # headers only: sizes and label modes
    return Data(root, options.dataset, train, val)


def open_decoded_cache(cache_dir: Path, data: Data, world: World) -> tuple[DecodedFrames, DecodedFrames]:
    """The decoded train and val frames in `cache_dir`: the first process of each node builds what is missing or
    stale (the folder may be node-local), the others wait for it, then every process maps the files."""
    cache_dir = cache_dir.expanduser()
    if world.local_rank == 0:
        for split, samples in (("train", data.train), ("val", data.val)):
            cached_or_built(cache_dir, data.root, split, samples, echo=log.info)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    return open_cache(cache_dir, data.root, "train", data.train), open_cache(cache_dir, data.root, "val", data.val)


def open_tracker(options: RunOptions, dataset: str, resume: Optional[tuple[RunFolder, dict[str, Any], Path]]
                 ) -> Tracker:
    """Rank 0: the tracking store, reached (or refused in one line) before the data and the model are set up, so a
    dead store costs seconds, not minutes. A resumed run keeps its own store unless told another."""
    folder = resume[0] if resume else None
    return Tracker(options.tracking_uri or (folder.info.get("tracking_uri") if folder else None)
                   or paths.default_tracking_uri(), dataset, offline=options.offline_tracking)


def open_run(checked: CheckedRun, tracker: Tracker, spec: Spec, plan: TrainPlan, data: Data, device: torch.device,
             starting: str, resume: Optional[tuple[RunFolder, dict[str, Any], Path]]
             ) -> tuple[RunFolder, Optional[str]]:
    """Rank 0: the run folder (new, or the resumed one) and its tracked run, started or reopened."""
    options = checked.options
    folder = resume[0] if resume else None
    if folder is not None:
        folder.claim()
        run_id = tracker.reopen(folder.path / JOURNAL_DIR, folder.tracking_run_id)
    else:
        folder = RunFolder.create(paths.runs_dir() / data.dataset / spec.row, row=spec.row, dataset=data.dataset,
                                  tracking_uri=tracker.tracking_uri, options=saved_options(options))
        try:
            run_id = tracker.start(folder.path / JOURNAL_DIR, spec.row,
                                   training_params(spec, plan, data.root, len(data.train), device.type),
                                   run_tags(spec, data.dataset, git_commit(), "train", "bench run", seed=plan.seed,
                                            starting_weights=starting))
        except BaseException:
            folder.end("FAILED")
            raise
        tracker.log_text(json.dumps(spec.to_dict(), indent=2), "spec.json")
        for split, context in (("train", "training"), ("val", "validation")):
            tracker.log_dataset(data.dataset, split, context, data.digests[split], len(getattr(data, split)),
                                str(data.root))
    folder.update(tracking_run_id=run_id, options=saved_options(options))
    return folder, run_id


def train(checked: CheckedRun, seed: int) -> Optional[TrainRecord]:
    """Train and evaluate one seed of a checked run in this process (one rank of it under torchrun); returns the
    result record on rank 0 and None on the other ranks."""
    world = world_from_env()
    options = replace(checked.options, seed=seed)
    spec = checked.spec
    if checked.init_checkpoint is not None:
        spec = replace(spec, model=replace(spec.model, init_checkpoint=str(checked.init_checkpoint)))
    device = pick_device(options.device, world)
    if options.deterministic:
        set_deterministic()
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed crop sizes: let cuDNN pick its fastest kernels once
    distributed.init(world, device.type)
    threads = torch.get_num_threads()
    # This process's share of the cores: several runs side by side each starting threads for the whole machine
    # slow every one of them far beyond its share.
    torch.set_num_threads(intra_op_threads(world.local_size))
    try:
        return _train(checked, options, spec, world, device)
    finally:
        torch.set_num_threads(threads)
        distributed.shutdown()


def _train(checked: CheckedRun, options: RunOptions, spec: Spec, world: World, device: torch.device
           ) -> Optional[TrainRecord]:
    data = find_data(checked, world)
    plan = make_plan(spec, data.dataset, len(data.train), precision=checked.compute.precision, world_size=world.size,
                     machine_workers=loader_workers(world.local_size), seed=options.seed, iters=options.iters,
                     eval_every=options.eval_every)
    resume = None
    if options.resume:
        resume = find_resume_target(options.resume, spec.row, data.dataset)
        refuse_changed_recipe(resume[1], spec, plan, resume[2])
        if world.is_main:
            log.info("resuming %s from %s (iteration %s)", spec.row, resume[2], resume[1]["iteration"])
    tracker = open_tracker(options, data.dataset, resume) if world.is_main else None
    # Seeded before anything draws random numbers: the loaders' generators, then the model's initial weights.
    seed_everything(plan.seed)
    loaders = make_loaders(checked, plan, data, world, device)
    model = build_model(spec)
    if resume is None:
        # Every rank loads the file; rank 0 alone says what it loaded or missed.
        with contextlib.nullcontext() if world.is_main else contextlib.redirect_stderr(io.StringIO()):
            starting = apply_starting_weights(model, spec, loud=data.dataset == REFERENCE_DATASET)
    else:  # a resumed run takes every tensor from its checkpoint, and keeps the status it started with
        starting = resume[1].get("starting_weights", "unknown")
    folder = run_id = None
    if tracker is not None:
        folder, run_id = open_run(checked, tracker, spec, plan, data, device, starting, resume)
        log_start(spec, plan, data, world, device, folder, tracker, run_id)
    checkpoints = Path(distributed.broadcast_object(str(folder.checkpoints) if folder else None))
    on_evaluation = early_warning(options, spec, plan, data.dataset, folder, tracker) \
        if folder is not None and tracker is not None else None
    trainer = Trainer(plan, model, device, world, log_metrics=tracker.log_metrics if tracker else None,
                      checkpoint_dir=checkpoints, progress=options.progress, compile_model=options.compile,
                      compute=checked.compute,
                      extra_state={"spec": spec.to_dict(), "starting_weights": starting}, on_evaluation=on_evaluation)
    if resume is not None:
        trainer.load_state_dict(resume[1])

    started = time.perf_counter()
    result = _fit(trainer, loaders, options, world, folder, tracker)
    if not world.is_main:
        return None
    assert folder is not None and tracker is not None
    try:
        weights = trainer.ema.module if trainer.ema is not None else trainer.model
        panels = prediction_panels(weights, data.val, plan, device, tracker.artifact_path("panels/.keep").parent)
        record = finish_training(tracker, folder, TrainingOutcome(
            spec=spec, plan=plan, dataset=data.dataset, processes=world.size, device_type=device.type, result=result,
            wall_time_s=time.perf_counter() - started, starting_weights=starting, commit=git_commit(),
            train_images=len(data.train), val_images=len(data.val), behind=folder.info.get("behind"),
            data_digests=data.digests), panels)
    except BaseException:
        end_run(folder, tracker, "FAILED")
        raise
    if data.dataset == REFERENCE_DATASET:  # benchmark.md shows Cityscapes runs only: other runs leave it as it is
        write_benchmark(after_record=True)
    return record


def _fit(trainer: Trainer, loaders: tuple[DataLoader, ShardedTrainSampler, DataLoader], options: RunOptions,
         world: World, folder: Optional[RunFolder], tracker: Optional[Tracker]) -> TrainResult:
    """The training itself, with the machine's figures beside it; a run that does not finish ends in its folder and
    its tracking run with the same status (KILLED: interrupted or stopped behind; FAILED: anything else)."""
    status = "FAILED"
    system = None
    if tracker is not None and tracker.journal is not None and not options.no_system_metrics:
        system = SystemMetrics(tracker.log_metrics, next_step(tracker.journal.metric_history())).start()
    try:
        result = trainer.fit(*loaders)
        status = "FINISHED"
        return result
    except Interrupted:
        status = "KILLED"
        raise
    except StoppedBehind:
        status = "KILLED"  # MLflow's word for a run ended before its budget; run.json says why
        if system is not None:
            system.stop()
        if folder is not None:
            end_run(folder, tracker, status)
            folder.update(status=STOPPED_BEHIND)
        raise
    finally:
        if system is not None:
            system.stop()
        if world.is_main and status != "FINISHED" and not (folder and folder.info.get("status") == STOPPED_BEHIND):
            end_run(folder, tracker, status)


def early_warning(options: RunOptions, spec: Spec, plan: TrainPlan, dataset: str, folder: RunFolder,
                  tracker: Tracker) -> Callable[[int, float], Optional[str]]:
    """Rank 0's hook at each evaluation: the headline mIoU against earlier runs of the row, dataset and budget
    (harness.report.behind), said in the log, MLflow (`behind_miou`, tag `behind`) and run.json (`behind`: the
    newest comparison, kept in the record); with --stop-if-behind, why to stop at an evaluation that is behind."""
    stop = options.stop_if_behind is not None
    margin = options.stop_if_behind if options.stop_if_behind is not None else BEHIND_MARGIN
    warning = EarlyWarning(spec, dataset, plan.iters, folder.path, margin=margin)

    def hook(iteration: int, miou: float) -> Optional[str]:
        comparison = warning.compare(iteration, miou)
        if comparison is None:
            return None
        tracker.log_metrics({BEHIND_MIOU: comparison.behind_miou}, iteration)
        stopping = comparison.flagged and stop and iteration < plan.iters
        folder.update(behind={**comparison.as_dict(), "stop": stopping})
        if not comparison.flagged:
            log.info("early warning: %s", comparison.describe())
            return None
        tracker.set_tags({"behind": f"{comparison.behind_miou:.2f} mIoU behind at iteration {iteration}"})
        then = "stopping here (resume with --resume)" if stopping else "pass --stop-if-behind to stop such a run"
        log.warning("warning: behind: %s; %s", comparison.describe(), then)
        return comparison.describe() if stopping else None

    return hook


def make_loaders(checked: CheckedRun, plan: TrainPlan, data: Data, world: World, device: torch.device
                 ) -> tuple[DataLoader, ShardedTrainSampler, DataLoader]:
    """This process's training loader and sampler (its share of each global batch) and its shard of val."""
    decoded_train = decoded_val = None
    if checked.options.decoded_cache:
        decoded_train, decoded_val = open_decoded_cache(Path(checked.options.decoded_cache), data, world)
    sampler = ShardedTrainSampler(len(data.train), checked.per_rank_batch, world, plan.seed)
    loader = train_loader(CityscapesTrain(data.train, plan.crop_size, plan.scale_range, plan.flip, decoded_train),
                          sampler, checked.per_rank_batch, plan.workers, device, plan.seed)
    val_shard = distributed.shard(range(len(data.val)), world)
    val_loader = eval_loader([data.val[i] for i in val_shard], device, plan.workers, persistent=True,
                             decoded=decoded_val.subset(val_shard) if decoded_val is not None else None)
    return loader, sampler, val_loader


def log_start(spec: Spec, plan: TrainPlan, data: Data, world: World, device: torch.device, folder: RunFolder,
              tracker: Tracker, run_id: Optional[str]) -> None:
    """The startup line: what trains where, and where its folder and tracked run are."""
    where = (f"{tracker.store_kind} run {run_id} at {tracker.tracking_uri}" if run_id else
             "tracking offline (journalled in the run folder; `bench sync` sends it to the store later)")
    print(f"segbench: {spec.row} on {data.dataset} ({data.root}); {world.size} process(es) on {device.type} "
          f"({torch.get_num_threads()} thread(s), {plan.workers} loader worker(s) each), {plan.precision}; "
          f"{plan.iters} iterations of batch {plan.batch_size}; run folder {folder.path}; {where}", flush=True)
    # How long it will take is measured, not assumed: the log says so after the first iterations (TrainLog).


def run(options: RunOptions) -> Optional[TrainRecord]:
    """Check and train one seed (`options.seed`) in this process: the Python entry point of `bench run` (harness.api
    re-exports it), through the same checks as the command line (`checked_run`). Returns its result record (None in
    a torchrun worker other than rank 0)."""
    checked = checked_run(options, [options.seed], LaunchOptions())
    return train(checked, options.seed)


STOPPED_BEHIND_EXIT = 3  # `--stop-if-behind` ended the run: not a failure, not a finished run either


def exit_code_for(interrupt: Interrupted) -> int:
    return 128 + int(interrupt.signum) if interrupt.signum else 1


def closing_line(record: TrainRecord) -> str:
    """'sf_seg_v2-ema seed 0 on synthetic: mIoU 54.62 (EMA, best at 400); raw 56.20; ...': the headline the record,
    MLflow and the tables hold, named, then the other weights' figure beside it."""
    ema = record.miou_weights == "ema"
    named = f"{'EMA, ' if ema else ''}best at {record.miou_iteration}"
    if ema:
        at = record.best_iteration
        other = f"; raw {record.miou_best:.2f}" + ("" if at == record.miou_iteration else f" (best at {at})")
    else:
        other = "" if record.best_iteration == record.iterations else f"; final {record.miou_final:.2f}"
    return (f"{record.row} seed {record.seed} on {record.dataset}: mIoU {record.miou:.2f} ({named})"
            f"{other}; {record.iterations} iterations, {record.wall_time_s:.0f} s; record {record.path}")


def folder_line(path: Path) -> str:
    """'run folder runs/...: 436 MB on disk (checkpoints: ckpt-00000300.pt, ckpt-00000400.pt, best.pt = ...)'."""
    names = [p.name for p in checkpoint.checkpoints(path / "checkpoints")]
    best = path / "checkpoints" / checkpoint.BEST
    if best.is_file():
        twin = next((n for n in names if os.path.samefile(path / "checkpoints" / n, best)), None)
        names.append(f"{checkpoint.BEST} = {twin}" if twin else checkpoint.BEST)
    return f"run folder {path}: {format_bytes(disk_usage(path))} on disk (checkpoints: {', '.join(sorted(names))})"


def check_readiness(checked: CheckedRun, launch: LaunchOptions) -> None:
    """A Cityscapes run asks `bench doctor`'s quick checks before it starts, quietly: too little disk for its
    checkpoints is refused (the run would fail at its first checkpoint); a dataset that cannot count, or a crop that
    a speed record says will not fit, is a one-line warning each (a subset or a short run may be meant)."""
    from harness.report.readiness import DoctorOptions, run_checks

    options = checked.options
    checks = run_checks(DoctorOptions(row=checked.spec.row, gpus=launch.gpus, nodes=launch.nnodes,
                                      data_root=options.data_root, iters=options.iters), quick=True)
    could_count = options.iters is None and not options.resume
    for check in checks:
        if not check.no_go or (check.name == "GPU memory" and checked.device_type != "cuda"):
            continue
        if check.name == "disk":
            raise BenchError(check.line())
        if check.name == "dataset" and not could_count:
            continue  # a short run or a resume is not a reproduction anyway
        log.warning("warning: %s", check.line())


def checked_run(options: RunOptions, seeds: Sequence[int], launch: LaunchOptions) -> CheckedRun:
    """Every check of a run, the one way in for `bench run` and the Python API alike: a light-seg row becomes its
    base row, a resume takes the options it was started with, the options are validated, and a run on real data
    asks readiness (`check_readiness`) before anything starts."""
    row, note = training_row(options.row)
    if note:
        log.info(note)
    options = replace(options, row=row, seed=seeds[0])
    if options.resume:
        options = with_saved_options(options)
    world = world_from_env()
    is_worker = "WORLD_SIZE" in os.environ  # a torchrun worker: the launcher started this process
    processes = world.size if is_worker else launch.processes
    checked = validate_run(options, seeds, processes, check_outputs=world.is_main)
    if not options.synthetic and not is_worker:
        check_readiness(checked, launch)
    return checked


def main(options: RunOptions, seeds: Sequence[int], launch: LaunchOptions,
         echo: Callable[[str], None] = print) -> int:
    """`bench run`: check everything once, then train each seed here or start torchrun's workers; the exit code."""
    checked = checked_run(options, seeds, launch)
    options, row = checked.options, checked.options.row
    world = world_from_env()
    is_worker = "WORLD_SIZE" in os.environ  # a torchrun worker: the launcher started this process
    if launch.processes > 1 and not is_worker:
        if options.device != "cpu" and torch.cuda.device_count() < launch.gpus:
            raise BenchError(f"--gpus {launch.gpus}: this machine has {torch.cuda.device_count()} CUDA devices; "
                             "use fewer, or --device cpu to run the processes on the CPU (gloo)")
        return distributed.launch(worker_argv(options, seeds), launch.gpus, launch.nnodes, launch.node_rank,
                                  launch.master_addr, launch.master_port)
    for index, seed in enumerate(seeds):
        try:
            record = train(checked, seed)
        except Interrupted as stop:
            if world.is_main:  # every rank stopped at the same iteration; one says so
                if stop.at_once:
                    where = (f"; the last checkpoint is {stop.path}" if stop.path else
                             "; no checkpoint had been written yet")
                else:
                    where = f"; checkpoint {stop.path}" if stop.path else ""
                then = (f"continue with: bench run --row {row} --resume" if stop.path else
                        f"start it again with: bench run --row {row}")
                log.warning("%s%s; %s", stop, where, then)
                if seeds[index + 1:]:
                    log.warning("seeds not started: %s", ",".join(map(str, seeds[index + 1:])))
            return exit_code_for(stop)
        except StoppedBehind as behind:
            if world.is_main:
                where = f"; checkpoint {behind.path}" if behind.path else ""
                log.warning("%s%s; continue it anyway with: bench run --row %s --resume", behind, where, row)
                if seeds[index + 1:]:
                    log.warning("seeds not started: %s", ",".join(map(str, seeds[index + 1:])))
            return STOPPED_BEHIND_EXIT
        if record is None:
            continue  # a non-zero rank of a distributed run
        echo(closing_line(record))
        echo(folder_line(Path(record.checkpoint).parent.parent))
        if random_start(record):
            log.warning("warning: started from random weights (%s); see `bench weights`", record.starting_weights)
    return 0
