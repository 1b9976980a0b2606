"""`bench sweep`: the whole table as one job per (row, seed) on Slurm (or locally) through submitit.

Each job runs the same training as `bench run` (a `bench run` subprocess; torchrun inside it for several GPUs),
skips what is already done or running, checkpoints and requeues on Slurm's warning signal or preemption
(submitit's checkpointing), and resumes from its run folder. Records land in results/ as `bench run` writes them,
so `bench table` and `bench check` see them with no extra step.

A sweep folder, runs/sweeps/<stamp>/, holds `sweep.json` (the jobs: row, seed, job id, log path), submitit's
folder, and one state file per job that the job itself writes (running / requeued / done / failed, its run
folder): `bench sweep status` reads those and the scheduler, from any shell that sees the folder.
"""

from __future__ import annotations

import ctypes
import json
import logging
import math
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

import submitit
from submitit.core.utils import DelayedSubmission

from harness import paths
from harness.config.benchmark import dataset_name
from harness.config.curves import BEHIND_MIOU
from harness.config.launchers import DEFAULT_GPUS, DEFAULT_MAX_REQUEUES, EXECUTORS
from harness.config.plan import planned_iterations
from harness.config.spec import Spec, select_rows
from harness.cores import CORES_ENV, job_cores
from harness.engine import checkpoint
from harness.engine.run_folder import RUN_STATUS, RunFolder
from harness.errors import BenchError
from harness.files import atomic_write_text
from harness.launch.options import RunOptions, check_data_root, check_options, parse_seeds, worker_argv
from harness.logs import configure_logging
from harness.report.records import ResultRecord, TrainRecord, load_records
from harness.report.verdicts import standing
from harness.tracking.backends import check_store, prepare_store
from harness.tracking.journal import JOURNAL_DIR, Journal

log = logging.getLogger(__name__)

SWEEP_FILE = "sweep.json"
SUBMITIT_DIR = "submitit"
STATE_DIR = "jobs"
CORES_PER_LOCAL_JOB = 2  # the default --max-parallel leaves each local job a core for its loop and one to spare
SIGNAL_DELAY_S = 180  # Slurm's warning before the limit: time to reach the next sync point and checkpoint
LOCAL_TIME_MIN = 7 * 24 * 60
# Scheduler states in which a job may still run (sacct's words, submitit's local ones).
ALIVE = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING",
         "RESIZING", "SUSPENDED", "PREEMPTED", "SIGNALING", "STAGE_OUT", "UNKNOWN"}
# Environment the job passes on to `bench run`: where specs, data cache, weights and outputs live.
PASSED_ENV = ("SEGBENCH_EXPERIMENTS", "SEGBENCH_CACHE", "SEGBENCH_WEIGHTS", "SEGBENCH_BENCHMARK")


@dataclass
class SweepOptions:
    rows: str
    seeds: list[int] = field(default_factory=lambda: [0])
    executor: str = "slurm"
    gpus_per_node: Optional[int] = None
    nodes: int = 1
    partition: Optional[str] = None
    time: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    slurm_args: dict[str, str] = field(default_factory=dict)
    dry_run: bool = False
    synthetic: bool = False
    data_root: Optional[str] = None
    iters: Optional[int] = None
    precision: Optional[str] = None
    tracking_uri: Optional[str] = None
    deterministic: bool = False
    max_requeues: int = DEFAULT_MAX_REQUEUES
    wait: Optional[bool] = None  # default: wait for local jobs, return at once on Slurm
    max_parallel: Optional[int] = None  # local jobs at once (default: from this machine's cores and GPUs)
    device: Optional[str] = None  # the GPU the jobs will run on, for --time and the memory check (bench plan's)

    @property
    def dataset(self) -> str:
        return dataset_name(self.synthetic)

    @property
    def gpus(self) -> int:
        """GPUs per node; 0 for CPU-only nodes (one training process per node, on the CPU)."""
        return self.gpus_per_node if self.gpus_per_node is not None else DEFAULT_GPUS[self.executor]

    @property
    def processes(self) -> int:
        """Training processes per node."""
        return max(1, self.gpus)


# --- option parsing ---------------------------------------------------------------------------------


def sweep_options(rows: Optional[str], seeds_text: str, slurm_args: Sequence[str], max_requeues: Optional[int],
                  **options: Any) -> SweepOptions:
    """`bench sweep`'s options as typed: the seed list and the sbatch flags read, the requeue limit's default where
    none was given (no --rows is refused by `sweep`, naming the subcommands too)."""
    return SweepOptions(rows=rows or "", seeds=parse_seeds(seeds_text), slurm_args=parse_slurm_args(slurm_args),
                        max_requeues=DEFAULT_MAX_REQUEUES if max_requeues is None else max_requeues, **options)


def parse_slurm_args(items: Sequence[str]) -> dict[str, str]:
    """`--slurm-arg KEY=VALUE` (repeatable): extra sbatch flags, e.g. constraint=a100 or cpus-per-task=64."""
    parsed = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise BenchError(f"--slurm-arg {item!r}: give KEY=VALUE, e.g. --slurm-arg constraint=a100")
        parsed[key.strip().lstrip("-")] = value.strip()
    return parsed


def parse_time(text: str) -> int:
    """Slurm's [D-]HH:MM:SS (or MM:SS) as whole minutes, rounded up."""
    match = re.fullmatch(r"(?:(\d+)-)?(?:(\d+):)?(\d+):(\d+)", text.strip())
    if not match:
        raise BenchError(f"--time {text!r}: give HH:MM:SS or D-HH:MM:SS, e.g. --time 48:00:00")
    days, hours, minutes, seconds = (int(g or 0) for g in match.groups())
    total = days * 1440 + hours * 60 + minutes + (seconds + 59) // 60
    if total < 1:
        raise BenchError(f"--time {text!r}: give at least one minute")
    return total


def check_sweep_options(options: SweepOptions) -> None:
    if options.executor not in EXECUTORS:
        raise BenchError(f"--executor {options.executor}: use one of {', '.join(EXECUTORS)}")
    if options.gpus < 0 or options.nodes < 1:
        raise BenchError(f"--gpus-per-node must be 0 (CPU only) or more and --nodes at least 1 (got {options.gpus}, "
                         f"{options.nodes})")
    if options.device is not None:
        from harness.report.estimates import resolve_device

        resolve_device(options.device)  # an unknown name is refused before anything is planned
    if options.executor == "local" and options.nodes > 1:
        raise BenchError(f"--nodes {options.nodes}: the local executor runs on this machine only; use --executor slurm")
    if options.max_parallel is not None:
        if options.executor != "local":
            raise BenchError("--max-parallel limits the local executor; on Slurm the scheduler decides what runs at "
                             "once (drop --max-parallel)")
        if options.max_parallel < 1:
            raise BenchError(f"--max-parallel {options.max_parallel}: give 1 or more")
    if options.max_requeues < 0:
        raise BenchError(f"--max-requeues {options.max_requeues}: give 0 or more")
    if options.time:
        parse_time(options.time)
    check_sbatch_values(options)
    check_options(RunOptions(row="-", synthetic=options.synthetic, data_root=options.data_root, iters=options.iters))
    if not options.synthetic and not (options.data_root or os.environ.get("CITYSCAPES_DATASET")):
        raise BenchError("no dataset given: pass --data-root DIR (or set CITYSCAPES_DATASET), or --synthetic")
    check_data_root(RunOptions(row="-", synthetic=options.synthetic, data_root=options.data_root))


SBATCH_KEY = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")


def check_sbatch_values(options: SweepOptions) -> None:
    """Each value becomes one `#SBATCH --key=value` line of the job script: a newline (or any control character)
    would end that line and start another directive, a key outside Slurm's spelling is no option."""
    given = [(f"--{name}", getattr(options, name)) for name in ("partition", "account", "qos", "time")]
    for key, value in options.slurm_args.items():
        if not SBATCH_KEY.fullmatch(key):
            raise BenchError(f"--slurm-arg {key}={value}: {key!r} is no sbatch option name (letters, digits, - and _)")
        given.append((f"--slurm-arg {key}", value))
    for option, value in given:
        if value is not None and any(ord(c) < 32 or ord(c) == 127 for c in str(value)):
            raise BenchError(f"{option} {str(value)!r}: holds a newline or another control character, which would "
                             "write another line into the job script; give the value on one line")


def check_shared_store(options: SweepOptions) -> None:
    """Slurm may run any two jobs on different nodes at once: one SQLite file cannot take their writes (on a
    network filesystem it locks up or corrupts), a tracking server on a real database can."""
    uri = options.tracking_uri or paths.default_tracking_uri()
    if options.executor != "slurm":
        return
    found = check_store(uri, writers=2, reach=False)  # a dry run reaches no server
    if found.ok is False:
        raise BenchError(f"tracking store of jobs on several nodes at once: {found.detail}; {found.fix}")


# --- which (row, seed) to run -------------------------------------------------------------------------


def select_specs(patterns: str) -> list[Spec]:
    """The training rows the globs name (`all`: every row), table rows then ours; a light-seg row trains its base
    row, once."""
    return select_rows(patterns, training=True)


def target_iterations(spec: Spec, options: SweepOptions) -> int:
    if options.iters is not None:
        return options.iters
    return spec.synthetic.iters if options.synthetic else planned_iterations(spec)


def done_record(spec: Spec, seed: int, options: SweepOptions, records: list[ResultRecord]) -> Optional[TrainRecord]:
    """The record that makes (row, seed) done: on Cityscapes at the planned budget, a counted record
    (harness.report.verdicts.standing); otherwise (synthetic, or a chosen --iters) a training record of that row,
    seed and number of iterations on the same dataset."""
    iters = target_iterations(spec, options)
    counted_rule = not options.synthetic and iters == planned_iterations(spec)
    for record in records:
        if not isinstance(record, TrainRecord) or record.row != spec.row or record.seed != seed:
            continue
        if counted_rule:
            if standing(spec, record).counts:
                return record
        elif record.dataset == options.dataset and record.iterations == iters:
            return record
    return None


def run_folders(row: str, dataset: str) -> list[RunFolder]:
    folders = []
    for run_file in sorted((paths.runs_dir() / dataset / row).glob("*/run.json")):
        try:
            folders.append(RunFolder.open(run_file.parent))
        except BenchError:
            continue
    return folders


def same_recipe(folder: RunFolder, run_options: RunOptions) -> bool:
    """Started with the options this job would pass (the recipe; tracking and launch options aside)."""
    saved = folder.info.get("options") or {}
    return all(saved.get(name) == getattr(run_options, name)
               for name in ("synthetic", "data_root", "iters", "seed", "precision", "deterministic"))


def resumable_folder(run_options: RunOptions, dataset: str) -> Optional[Path]:
    """The newest interrupted run of the same recipe with a checkpoint: a job continues it instead of starting
    over (what a preempted job left behind, or a run stopped by hand)."""
    for folder in reversed(run_folders(run_options.row, dataset)):
        if folder.status == RUN_STATUS["KILLED"] and same_recipe(folder, run_options) \
                and checkpoint.checkpoints(folder.checkpoints):
            return folder.path
    return None


@dataclass
class Task:
    row: str
    seed: int
    action: str  # "submit" or "skip"
    reason: str = ""
    resume: Optional[str] = None


def base_run_options(spec: Spec, seed: int, options: SweepOptions) -> RunOptions:
    """The `bench run` options of one job; data root and tracking URI resolved to absolute values, so the job
    does not depend on the environment it lands in."""
    data_root = None
    if not options.synthetic:
        data_root = str(Path(options.data_root or os.environ["CITYSCAPES_DATASET"]).expanduser().resolve())
    return RunOptions(row=spec.row, synthetic=options.synthetic, data_root=data_root, iters=options.iters,
                      seed=seed, tracking_uri=options.tracking_uri or paths.default_tracking_uri(),
                      device="cpu" if options.gpus == 0 else None, precision=options.precision,
                      deterministic=options.deterministic, progress=False)


def plan_tasks(options: SweepOptions) -> list[Task]:
    records = load_records(dataset=options.dataset)
    live = live_jobs(options.dataset)
    tasks = []
    for spec in select_specs(options.rows):
        for seed in options.seeds:
            record = done_record(spec, seed, options, records)
            if record is not None:
                tasks.append(Task(spec.row, seed, "skip", f"done: {record.path}"))
                continue
            running = [f for f in run_folders(spec.row, options.dataset)
                       if (f.info.get("options") or {}).get("seed") == seed and f.still_running()]
            if running:
                tasks.append(Task(spec.row, seed, "skip", f"running: {running[-1].path}"))
                continue
            key = (spec.row, seed, target_iterations(spec, options))
            if key in live:
                tasks.append(Task(spec.row, seed, "skip", live[key]))
                continue
            resume = resumable_folder(base_run_options(spec, seed, options), options.dataset)
            tasks.append(Task(spec.row, seed, "submit", f"resumes {resume}" if resume else "",
                              str(resume) if resume else None))
    return tasks


# --- the job ------------------------------------------------------------------------------------------


def _child_setup() -> None:
    """In the `bench run` process: Slurm signals every process of the job; the warning signal is for the job
    (which then stops training with SIGTERM), not a reason for the trainer to die. If the job process dies, the
    trainer gets SIGTERM and checkpoints (Linux's parent-death signal)."""
    signal.signal(submitit.JobEnvironment._usr_sig(), signal.SIG_IGN)
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def job_argv(run_options: RunOptions, gpus: int, nodes: int, node_rank: str, master_addr: str,
             master_port: str) -> list[str]:
    """The `bench run` command line of a job on one node: torchrun (one process per GPU, one on a CPU-only node)
    through `bench run --gpus`, several nodes rendezvousing on the first node of the allocation."""
    argv = worker_argv(run_options, [run_options.seed])
    if gpus > 1 or nodes > 1:
        argv += ["--gpus", str(max(1, gpus))]
    if nodes > 1:
        argv += ["--nnodes", str(nodes), "--node-rank", node_rank, "--master-addr", master_addr,
                 "--master-port", master_port]
    return [sys.executable, "-m", "harness.cli", *argv]


def read_state(path: Path) -> dict[str, Any]:
    try:
        state = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return state if isinstance(state, dict) else {}


def write_state(path: Path, **changes: Any) -> dict[str, Any]:
    """Update a job's state file atomically; a cancelled job stays cancelled whatever its process reports last."""
    state = read_state(path)
    if state.get("state") == "cancelled" and changes.get("state") != "cancelled":
        return state
    state = {**state, **changes, "updated": time.time()}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(state, indent=2, sort_keys=True) + "\n")
    return state


class TrainingJob:
    """What submitit runs for one (row, seed): `bench run` as a subprocess, watched; `checkpoint()` is submitit's
    hook on the warning signal or preemption."""

    def __init__(self, run_options: RunOptions, gpus: int, nodes: int, env: dict[str, str], state_file: str,
                 max_requeues: int, requeues: int = 0):
        self.run_options, self.gpus, self.nodes, self.env = run_options, gpus, nodes, env
        self.state_file, self.log_path = state_file, "its submitit log"
        self.max_requeues, self.requeues = max_requeues, requeues
        self._process: Optional[subprocess.Popen] = None
        self._run_dir: Optional[str] = run_options.resume
        self._before: set[str] = set()

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_process": None}

    @property
    def dataset(self) -> str:
        return dataset_name(self.run_options.synthetic)

    def _find_run_dir(self) -> Optional[str]:
        """This job's run folder: the one it resumes, else the new folder its `bench run` created."""
        if self._run_dir is None:
            new = [f for f in run_folders(self.run_options.row, self.dataset)
                   if str(f.path) not in self._before and same_recipe(f, self.run_options)]
            if new:
                self._run_dir = str(new[-1].path)
                write_state(Path(self.state_file), run_folder=self._run_dir)
        return self._run_dir

    def _resume_target(self) -> Optional[str]:
        """Where to go on from: the run folder handed over by `checkpoint()` or by the sweep, or this job's own
        folder from an earlier start (Slurm requeued it without a checkpoint call)."""
        for candidate in (self.run_options.resume, read_state(Path(self.state_file)).get("run_folder")):
            if candidate and RunFolder.is_run_folder(Path(candidate)):
                return candidate
        return None

    def __call__(self) -> str:
        configure_logging()  # the job's own process, started by submitit: its lines go to the job's log
        env = submitit.JobEnvironment()
        main = env.global_rank == 0
        self.log_path = str(env.paths.stderr)
        state_path = Path(self.state_file)
        run_options = self.run_options
        attempt = f"{env.job_id}:{os.environ.get('SLURM_RESTART_COUNT', '0')}:{self.requeues}"
        if main:
            target = self._resume_target()
            if target and RunFolder.open(Path(target)).status == RUN_STATUS["FINISHED"]:
                write_state(state_path, state="done", run_folder=target, attempt=attempt)
                return f"already finished: {target}"
            if target and not checkpoint.checkpoints(Path(target) / "checkpoints"):
                target = None  # stopped before its first checkpoint: nothing to resume, start over
            run_options = replace(run_options, resume=target)
            self._run_dir = target
            write_state(state_path, state="running", job_id=env.job_id, host=socket.gethostname(), pid=os.getpid(),
                        requeues=self.requeues, run_folder=target, attempt=attempt, resume=target)
        else:  # the other nodes resume what node 0 decided for this very attempt
            deadline = time.time() + 600
            while read_state(state_path).get("attempt") != attempt:
                if time.time() > deadline:
                    raise RuntimeError(f"node 0 of job {env.job_id} did not start within 10 minutes")
                time.sleep(2)
            run_options = replace(run_options, resume=read_state(state_path).get("resume"))
        hosts = env.hostnames
        port = str(20000 + int(re.sub(r"\D", "", env.job_id) or 0) % 20000)
        # One task per node: a task's rank is its node's rank (and two tasks on one node can stand in for two nodes).
        command = job_argv(run_options, self.gpus, self.nodes, str(env.global_rank), hosts[0], port)
        log.info("segbench sweep: %s", shlex.join(command))
        self._before = {str(f.path) for f in run_folders(run_options.row, self.dataset)}
        self._process = subprocess.Popen(command, env={**os.environ, **self.env}, cwd=paths.PROJECT_ROOT,
                                          start_new_session=True, preexec_fn=_child_setup)
        while True:
            try:
                code = self._process.wait(timeout=0.5)  # notes the run folder soon after `bench run` creates it
                break
            except subprocess.TimeoutExpired:
                if main:
                    self._find_run_dir()
        if not main:
            if code:
                raise RuntimeError(f"bench run on node {env.node} exited with {code}")
            return "done"
        run_dir = self._find_run_dir()
        if code == 0:
            write_state(state_path, state="done", run_folder=run_dir, exit_code=0)
            return f"done: {run_dir}"
        if code == 128 + signal.SIGTERM:
            message = (f"interrupted by SIGTERM (preempted or cancelled) with a checkpoint in {run_dir}; "
                       f"`bench sweep` again resumes it")
            write_state(state_path, state="interrupted", run_folder=run_dir, exit_code=code, reason=message)
            raise RuntimeError(message)
        message = f"bench run exited with {code}; see {self.log_path}"
        write_state(state_path, state="failed", run_folder=run_dir, exit_code=code, reason=message)
        raise RuntimeError(message)

    def checkpoint(self) -> Optional[DelayedSubmission]:
        """On the warning signal or preemption: stop `bench run` with SIGTERM (it checkpoints and exits 143), then
        hand submitit the same job resuming that run folder; None past --max-requeues, which fails the job."""
        process, state_path = self._process, Path(self.state_file)
        if process is not None and process.poll() is None:
            try:
                os.killpg(process.pid, signal.SIGTERM)  # every torchrun worker, which stop at the same iteration
            except ProcessLookupError:
                pass
            try:
                process.wait(timeout=SIGNAL_DELAY_S - 30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        run_dir = self._find_run_dir()
        if self.requeues >= self.max_requeues:
            write_state(state_path, state="failed", run_folder=run_dir,
                        reason=f"stopped {self.requeues + 1} times; not requeued again (--max-requeues "
                               f"{self.max_requeues}); `bench sweep` again resumes it; log {self.log_path}")
            return None
        write_state(state_path, state="requeued", run_folder=run_dir, requeues=self.requeues + 1)
        resumed = replace(self.run_options, resume=run_dir)
        return DelayedSubmission(TrainingJob(resumed, self.gpus, self.nodes, self.env, self.state_file,
                                             self.max_requeues, self.requeues + 1))


# --- submitting ------------------------------------------------------------------------------------------


def sweeps_dir() -> Path:
    return paths.runs_dir() / "sweeps"


def job_env() -> dict[str, str]:
    """Where `bench run` reads and writes, resolved here and passed to every job explicitly."""
    env = {"SEGBENCH_RUNS": str(paths.runs_dir()), "SEGBENCH_RESULTS": str(paths.results_dir()),
           "MLFLOW_TRACKING_URI": paths.default_tracking_uri(), "PYTHONUNBUFFERED": "1"}
    for name in PASSED_ENV:
        if os.environ.get(name):
            env[name] = str(Path(os.environ[name]).expanduser().resolve())
    return env


def slurm_parameters(options: SweepOptions) -> dict[str, Any]:
    """sbatch parameters (submitit's names): one task per node, the node's GPUs to that task (none asked for on
    CPU-only nodes, --gpus-per-node 0)."""
    params: dict[str, Any] = {
        "job_name": "segbench", "nodes": options.nodes, "ntasks_per_node": 1,
        "time": parse_time(options.time) if options.time else 24 * 60, "signal_delay_s": SIGNAL_DELAY_S,
    }
    if options.gpus:
        params["gpus_per_node"] = options.gpus
    for name in ("partition", "account", "qos"):
        if getattr(options, name):
            params[name] = getattr(options, name)
    if options.slurm_args:
        params["additional_parameters"] = dict(options.slurm_args)
    return params


def sbatch_script(options: SweepOptions, folder: Path) -> str:
    """The sbatch file submitit writes for each job (it runs the pickled job, which runs the job's command)."""
    from submitit.slurm.slurm import _make_sbatch_string

    command = " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(folder))])
    return _make_sbatch_string(command=command, folder=folder, **slurm_parameters(options))


def check_scheduler(options: SweepOptions) -> None:
    if options.executor == "slurm" and (shutil.which("sbatch") is None or shutil.which("srun") is None):
        raise BenchError("--executor slurm: no sbatch/srun on this machine; run on a Slurm login node, or use "
                         "--dry-run to see the script, or --executor local")


def make_executor(options: SweepOptions, folder: Path):
    if options.executor == "local":
        import torch

        executor = submitit.LocalExecutor(folder, max_num_timeout=options.max_requeues)
        executor.update_parameters(timeout_min=parse_time(options.time) if options.time else LOCAL_TIME_MIN,
                                   gpus_per_node=options.gpus if torch.cuda.is_available() else 0,
                                   signal_delay_s=SIGNAL_DELAY_S)
        return executor
    check_scheduler(options)
    slurm = submitit.SlurmExecutor(folder, max_num_timeout=options.max_requeues)
    slurm.update_parameters(**slurm_parameters(options))
    return slurm


# --- time limit and readiness (bench plan, bench doctor) ---------------------------------------------------------

TIME_MARGIN = 1.25  # a chosen --time: the longest job's estimated wall time times this, in whole quarter hours
TIME_MAX_MIN = 48 * 60  # ... at most this (a longer job is stopped at the limit, requeued and resumed)


def slurm_time(minutes: int) -> str:
    return f"{minutes // 60}:{minutes % 60:02d}:00"


def choose_time(options: SweepOptions, job_specs: list[Spec], echo=print) -> SweepOptions:
    """Slurm's --time from `bench plan` when none is given; a given one shorter than a job's estimate is a warning
    (that job will reach the limit, be requeued and resume from its checkpoint)."""
    if options.synthetic or options.executor != "slurm" or not job_specs:
        return options
    from harness.report.estimates import Rates, hours, resolve_device, row_cost

    if options.time and options.device is None:
        try:
            target = resolve_device(None)
        except BenchError:
            return options  # a given --time needs no estimate; the warning needs a device
    else:
        target = resolve_device(options.device)  # without a --time, no device is a one-line refusal
    rates = Rates(target, measure_peak=False)
    costs = [row_cost(spec, rates, options.gpus * options.nodes, iterations=target_iterations(spec, options))
             for spec in {spec.row: spec for spec in job_specs}.values()]
    known = [c for c in costs if c.wall_hours is not None]
    if not known:
        echo(f"note: no `bench speed` record or peak of {rates.device} to estimate the jobs' wall time; "
             f"--time is {options.time or slurm_time(24 * 60)} (run `bench speed --rows ...` on the GPU, then "
             "`bench plan`)")
        return options
    longest = max(known, key=lambda c: c.wall_hours or 0.0)
    if options.time:
        limit = parse_time(options.time)
        short = [c for c in known if (c.wall_hours or 0.0) * 60 > limit]
        if short:
            echo(f"warning: --time {options.time} is shorter than the estimated wall time of {len(short)} job(s) ("
                 + ", ".join(f"{c.row} {hours(c.wall_hours)}" for c in short)
                 + "): each will be stopped at the limit and requeued, resuming from its checkpoint "
                   f"(at most --max-requeues {options.max_requeues} times)")
        return options
    estimate = math.ceil((longest.wall_hours or 0.0) * 60)
    minutes = min(TIME_MAX_MIN, 15 * math.ceil(estimate * TIME_MARGIN / 15))
    capped = f", capped at {slurm_time(TIME_MAX_MIN)} (longer jobs requeue and resume)" \
        if minutes == TIME_MAX_MIN else ""
    echo(f"--time {slurm_time(minutes)} chosen by `bench plan`: the longest job, {longest.row}, is estimated at "
         f"{hours(longest.wall_hours)} on {options.gpus * options.nodes} GPU(s) ({longest.label}), "
         f"x{TIME_MARGIN:g}{capped}")
    return replace(options, time=slurm_time(minutes))


def readiness(options: SweepOptions, job_specs: list[Spec], echo=print) -> list[str]:
    """`bench doctor`'s no-go lines for the jobs about to be submitted (Cityscapes sweeps): on Slurm every job may
    write to the tracking store at once."""
    if options.synthetic or not job_specs:
        return []
    from harness.report.readiness import DoctorOptions, sweep_checks

    doctor = DoctorOptions(row=job_specs[0].row, gpus=options.gpus, nodes=options.nodes, data_root=options.data_root,
                           tracking_uri=options.tracking_uri, iters=options.iters, device=options.device,
                           writers=len(job_specs) if options.executor == "slurm" else 1)
    problems = list(dict.fromkeys(check.line() for check in sweep_checks(job_specs, doctor) if check.no_go))
    for line in problems:
        echo(f"no-go: {line}")
    return problems


def sweep(options: SweepOptions, echo=print) -> Optional[Path]:
    """Plan, print and submit the sweep; returns its folder (None when nothing was submitted)."""
    if not options.rows:
        raise BenchError("bench sweep needs --rows GLOB[,GLOB] (e.g. --rows all), or a subcommand: status, cancel")
    check_sweep_options(options)
    tasks = plan_tasks(options)
    check_shared_store(options)
    from tabulate import tabulate

    echo(tabulate([[t.row, t.seed, t.action, t.reason] for t in tasks], headers=["row", "seed", "action", "why"],
                  disable_numparse=True))
    to_submit = [t for t in tasks if t.action == "submit"]
    specs = {s.row: s for s in select_specs(options.rows)}
    job_specs = [specs[t.row] for t in to_submit]
    options = choose_time(options, job_specs, echo)
    problems = readiness(options, job_specs, echo)
    if problems and not options.dry_run:
        raise BenchError(f"{len(problems)} no-go check(s) above: nothing submitted; fix them (`bench doctor --row ROW` "
                         "shows one row's checks)")
    if options.dry_run:
        print_dry_run(options, tasks, specs, len(problems), echo)
        return None
    if not to_submit:
        echo("nothing to submit: every (row, seed) is done or running")
        return None
    check_scheduler(options)  # before the sweep folder: a refusal leaves no empty one
    prepare_store(options.tracking_uri or paths.default_tracking_uri())
    sweep_dir = new_sweep_folder()
    executor = make_executor(options, sweep_dir / SUBMITIT_DIR)
    submitted = submit_jobs(options, to_submit, specs, executor, sweep_dir, echo)
    wait = options.wait if options.wait is not None else options.executor == "local"
    if wait:
        wait_for_jobs(sweep_dir, submitted, echo)
    else:
        echo("not waiting for the jobs: this exit code says only that they were submitted; "
             f"`bench sweep status {sweep_dir}` says how they end")
    return sweep_dir


def print_dry_run(options: SweepOptions, tasks: list[Task], specs: dict[str, Spec], problems: int, echo) -> None:
    """The sbatch script and each job's command line, without submitting anything."""
    to_submit = [t for t in tasks if t.action == "submit"]
    folder = sweeps_dir() / "<stamp>" / SUBMITIT_DIR
    if options.executor == "slurm":
        echo("\n# sbatch script submitit submits for each job:\n" + sbatch_script(options, folder))
    echo("# each job runs (bench run --gpus N starts torchrun, one process per GPU):")
    for task in to_submit:
        run_options = replace(base_run_options(specs[task.row], task.seed, options), resume=task.resume)
        argv = job_argv(run_options, options.gpus, options.nodes, "$SLURM_NODEID",
                        "<first host of $SLURM_JOB_NODELIST>", "<20000 + job id % 20000>")
        echo(f"{task.row} seed {task.seed}: {shlex.join(argv)}")
    echo(f"dry run: {len(to_submit)} job(s) would be submitted, {len(tasks) - len(to_submit)} skipped"
         + (f"; {problems} no-go check(s) above would stop the submission" if problems else ""))


def new_sweep_folder() -> Path:
    sweep_dir = sweeps_dir() / time.strftime("%Y%m%d-%H%M%S")
    while sweep_dir.exists():
        sweep_dir = sweep_dir.with_name(sweep_dir.name + "+")
    (sweep_dir / STATE_DIR).mkdir(parents=True)
    return sweep_dir


def submit_jobs(options: SweepOptions, to_submit: list[Task], specs: dict[str, Spec], executor, sweep_dir: Path,
                echo) -> list[Any]:
    """Every task as a job, recorded in sweep.json as it goes; the local executor runs at most --max-parallel at
    once, each given its share of the cores."""
    env = job_env()
    parallel = len(to_submit)
    if options.executor == "local":
        parallel = options.max_parallel or default_max_parallel(options.gpus)
        env[CORES_ENV] = str(max(1, job_cores() // min(parallel, len(to_submit))))  # each job's share
    meta: dict[str, Any] = {"created": time.time(), "executor": options.executor, "host": socket.gethostname(),
                            "pid": os.getpid(), "dataset": options.dataset, "options": asdict(options),
                            "submitit_folder": str(sweep_dir / SUBMITIT_DIR), "jobs": []}
    queue: list[tuple[dict[str, Any], TrainingJob]] = []
    for task in to_submit:
        spec = specs[task.row]
        state_file = sweep_dir / STATE_DIR / f"{task.row}-seed{task.seed}.json"
        run_options = replace(base_run_options(spec, task.seed, options), resume=task.resume)
        write_state(state_file, state="queued")
        entry: dict[str, Any] = {"row": task.row, "seed": task.seed, "iterations": target_iterations(spec, options),
                                 "job_id": None, "state_file": str(state_file), "log": None, "stdout": None,
                                 "resume": task.resume}
        meta["jobs"].append(entry)
        queue.append((entry, TrainingJob(run_options, options.gpus, options.nodes, env, str(state_file),
                                         options.max_requeues)))
    _write_meta(sweep_dir, meta)
    submitted: list[Any] = []
    while queue:
        if sum(not job.done() for job in submitted) >= parallel:
            time.sleep(1)
            continue
        entry, training_job = queue.pop(0)
        state_file = Path(entry["state_file"])
        # Before the job can start and say more; a job `bench sweep cancel` cancelled while it waited stays so.
        if write_state(state_file, state="submitted").get("state") == "cancelled":
            continue
        job = executor.submit(training_job)
        submitted.append(job)
        entry.update(job_id=job.job_id, log=str(job.paths.stderr), stdout=str(job.paths.stdout))
        write_state(state_file, job_id=job.job_id, log=entry["log"])
        _write_meta(sweep_dir, meta)  # after each job: a crash mid-submission still leaves the jobs findable
        if len(submitted) == parallel or not queue:
            echo(f"submitted {len(submitted)} of {len(to_submit)} job(s) to {options.executor}"
                 + (f" ({parallel} at once)" if parallel < len(to_submit) else "")
                 + f"; sweep folder {sweep_dir}; watch with: bench sweep status {sweep_dir}")
    return submitted


def wait_for_jobs(sweep_dir: Path, submitted: list[Any], echo) -> None:
    """Until every job ends; then their states, and exit 1 naming each job that did not finish."""
    while not all(job.done() for job in submitted):
        time.sleep(1)
    echo(render_status(sweep_dir))
    failed = [f"{r['row']} seed {r['seed']} ({r['last_line']})" for r in status_rows(sweep_dir)[1]
              if r["state"] != "done"]
    if failed:
        raise JobsFailed(f"{len(failed)} of {len(submitted)} job(s) did not finish: {'; '.join(failed)}; "
                         "fix the cause and run the same `bench sweep` again (done jobs are skipped)")


class JobsFailed(BenchError):
    """A sweep that waited for its jobs, some of which failed: exit 1, not the 2 of bad input."""

    exit_code = 1


def default_max_parallel(gpus: int) -> int:
    """Local jobs at once: a couple of cores each (more jobs than that only slow every one of them down), and on a
    GPU machine no more than its GPUs hold."""
    parallel = max(1, job_cores() // CORES_PER_LOCAL_JOB)
    import torch

    if gpus and torch.cuda.is_available():
        parallel = min(parallel, max(1, torch.cuda.device_count() // gpus))
    return parallel


def _write_meta(sweep_dir: Path, meta: dict[str, Any]) -> None:
    atomic_write_text(sweep_dir / SWEEP_FILE, json.dumps(meta, indent=2) + "\n")


# --- status and cancel -----------------------------------------------------------------------------------


def load_sweep(sweep_dir: Optional[Path]) -> tuple[Path, dict[str, Any]]:
    if sweep_dir is None:
        found = sorted(sweeps_dir().glob(f"*/{SWEEP_FILE}"))
        if not found:
            raise BenchError(f"no sweep under {sweeps_dir()}; start one with `bench sweep --rows ...`, or give its "
                             "folder")
        sweep_dir = found[-1].parent
    return sweep_dir, read_sweep_file(sweep_dir / SWEEP_FILE)


# The fields of sweep.json that status, cancel and the next sweep read, with the types `submit_jobs` writes.
SWEEP_FIELDS: dict[str, tuple[type, ...]] = {"executor": (str,), "jobs": (list,)}
JOB_FIELDS: dict[str, tuple[type, ...]] = {"row": (str,), "seed": (int,), "state_file": (str,),
                                           "job_id": (str, int, type(None)), "log": (str, type(None))}


def read_sweep_file(path: Path) -> dict[str, Any]:
    """A sweep folder's sweep.json, its fields checked: anything unreadable, cut, or lacking a field is one line
    naming the file and the field."""
    fix = f"give a sweep folder runs/sweeps/<stamp>, or remove {path.parent} if it is no sweep of yours"
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise BenchError(f"{path.parent} is not a sweep folder (no readable {SWEEP_FILE}: {reason}); {fix}") from None
    problem = _missing_field(meta, SWEEP_FIELDS, "")
    for index, job in enumerate(meta.get("jobs", []) if not problem else []):
        problem = problem or _missing_field(job, JOB_FIELDS, f"jobs[{index}].")
    if problem is None and meta["executor"] == "slurm" and meta["jobs"] \
            and not isinstance(meta.get("submitit_folder"), str):
        problem = "'submitit_folder' (text) is missing"
    if problem:
        raise BenchError(f"{path}: {problem}; {fix}")
    return meta


def _missing_field(value: Any, fields: dict[str, tuple[type, ...]], prefix: str) -> Optional[str]:
    if not isinstance(value, dict):
        return f"{prefix.rstrip('.') or 'the file'} is a JSON {type(value).__name__}, not an object"
    for name, types in fields.items():
        if name not in value:
            return f"'{prefix}{name}' is missing"
        if not isinstance(value[name], types) or (isinstance(value[name], bool) and bool not in types):
            return f"'{prefix}{name}' is {type(value[name]).__name__}, not {' or '.join(t.__name__ for t in types)}"
    return None


def _process_state(pid: Any, host: Optional[str]) -> str:
    """RUNNING while process `pid` of this machine lives, FINISHED once it is gone."""
    if host != socket.gethostname():
        return "UNKNOWN"
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return "FINISHED"
    except (PermissionError, ValueError, TypeError):
        return "UNKNOWN"
    return "RUNNING"


def _first_word(command: list[str]) -> Optional[str]:
    """The first word `command` prints; "" when it answers with nothing, None when it cannot answer."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    words = done.stdout.split()
    if words:
        return words[0]
    return "" if done.returncode == 0 or "Invalid job id" in done.stderr else None


def slurm_state(job_id: str) -> str:
    """Slurm's word for a job: the controller's (squeue, which keeps ended jobs for a few minutes), else the
    accounting database's (sacct); ENDED when the controller no longer knows it and there is no accounting."""
    queued = _first_word(["squeue", "--noheader", "--states=all", "--jobs", job_id, "--format=%T"]) \
        if shutil.which("squeue") else None
    if queued:
        return queued
    accounted = _first_word(["sacct", "--noheader", "--allocations", "--parsable2", "--jobs", job_id,
                             "--format=State"]) if shutil.which("sacct") else None
    if accounted:
        return accounted.split("|")[0]
    return "ENDED" if queued == "" else "UNKNOWN"


def scheduler_state(meta: dict[str, Any], job: dict[str, Any]) -> str:
    """The scheduler's word for the job: Slurm's (slurm_state); locally RUNNING while its controller lives, and
    PENDING while a job not yet started waits for the sweep that will start it."""
    if meta.get("executor") == "local":
        if job.get("job_id") is None:
            return "PENDING" if _process_state(meta.get("pid"), meta.get("host")) == "RUNNING" else "ENDED"
        return _process_state(job["job_id"], meta.get("host"))
    if job.get("job_id") is None:
        return "ENDED"  # the sweep stopped before submitting it
    return slurm_state(str(job["job_id"]))


def job_status(meta: dict[str, Any], job: dict[str, Any]) -> tuple[str, str]:
    """(pending / running / requeued / done / failed / cancelled, why)."""
    state = read_state(Path(job["state_file"]))
    word = state.get("state", "submitted")
    if word in ("done", "failed", "cancelled"):
        return word, state.get("reason", "")
    scheduler = scheduler_state(meta, job)
    alive = scheduler in ALIVE
    if word == "queued":
        return ("pending", "") if alive else ("failed", "never submitted: the sweep stopped first; `bench sweep` "
                                                        "again submits it")
    if word == "submitted":
        return ("pending", "") if alive else ("failed", f"the job ended ({scheduler}) before it started; see its log")
    if word in ("requeued", "interrupted"):
        return ("requeued", "") if alive else ("failed", state.get("reason") or f"ended ({scheduler}) after a requeue")
    if scheduler in ("PENDING", "REQUEUED", "REQUEUE_HOLD"):
        return "requeued", ""
    return ("running", "") if alive else ("failed", f"the job ended ({scheduler}) without reporting; see its log")


def progress(run_dir: Optional[str]) -> str:
    """iteration/total from the run's journal (the newest logged step), else its newest checkpoint's name."""
    if not run_dir or not Path(run_dir).is_dir():
        return "-"
    total, step = None, None
    journal = Path(run_dir) / JOURNAL_DIR
    if Journal.exists(journal):
        total, step = Journal(journal).params().get("iters"), Journal(journal).training_step()
    if step is None:
        newest = checkpoint.checkpoints(Path(run_dir) / "checkpoints")
        if newest:
            step = int(newest[0].stem.split("-")[-1])
    return f"{step if step is not None else 0}/{total if total is not None else '?'}"


def behind(run_dir: Optional[str]) -> str:
    """The run's newest early-warning comparison (run.json's `behind`): '-' without one, 'ok' within the threshold,
    else how far behind, at which iteration (and 'stopped' when --stop-if-behind ended it)."""
    if not run_dir or not RunFolder.is_run_folder(Path(run_dir)):
        return "-"
    try:
        comparison = RunFolder.open(Path(run_dir)).info.get("behind")
    except BenchError:
        return "-"
    if not comparison:
        return "-"
    if not comparison.get("flagged"):
        return "ok"
    return (f"{comparison[BEHIND_MIOU]:.1f} at {comparison['iteration']}"
            + (", stopped" if comparison.get("stop") else ""))


def last_line(log: Optional[str]) -> str:
    if not log:
        return "-"
    try:
        with open(log, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 8192))
            tail = f.read().decode(errors="replace")
    except OSError:
        return "-"
    lines = [part.strip() for line in tail.splitlines() for part in line.split("\r") if part.strip()]
    return lines[-1][:100] if lines else "-"


def status_rows(sweep_dir: Optional[Path] = None) -> tuple[Path, list[dict[str, Any]]]:
    sweep_dir, meta = load_sweep(sweep_dir)
    rows = []
    for job in meta["jobs"]:
        word, why = job_status(meta, job)
        state = read_state(Path(job["state_file"]))
        rows.append({"row": job["row"], "seed": job["seed"], "state": word, "job_id": job["job_id"] or "-",
                     "progress": progress(state.get("run_folder")), "behind": behind(state.get("run_folder")),
                     "last_line": why or last_line(job["log"]),
                     "log": job["log"], "run_folder": state.get("run_folder")})
    return sweep_dir, rows


def render_status(sweep_dir: Optional[Path] = None) -> str:
    from tabulate import tabulate

    sweep_dir, rows = status_rows(sweep_dir)
    table = tabulate([[r["row"], r["seed"], r["state"], r["job_id"], r["progress"], r["behind"], r["last_line"],
                       r["log"]] for r in rows],
                     headers=["row", "seed", "state", "job", "progress", "behind", "last log line", "log"],
                     disable_numparse=True)
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    return f"sweep {sweep_dir}\n{table}\n" + ", ".join(f"{n} {word}" for word, n in sorted(counts.items()))


def live_jobs(dataset: str) -> dict[tuple[str, int, int], str]:
    """(row, seed, iterations) of jobs of earlier sweeps that may still run: a new sweep does not submit them twice."""
    live = {}
    for sweep_file in sorted(sweeps_dir().glob(f"*/{SWEEP_FILE}")):
        try:
            meta = read_sweep_file(sweep_file)
        except BenchError as exc:
            log.warning("warning: skipping %s: %s", sweep_file.parent, exc)
            continue
        if meta.get("dataset") != dataset:
            continue
        for job in meta.get("jobs", []):
            word, _ = job_status(meta, job)
            if word in ("pending", "running", "requeued"):
                live[(job["row"], job["seed"], job.get("iterations"))] = \
                    f"{word} in sweep {sweep_file.parent} (job {job['job_id']})"
    return live


def cancel(sweep_dir: Optional[Path] = None) -> list[str]:
    """Cancel the sweep's jobs still pending or running; each `bench run` checkpoints on its way out."""
    sweep_dir, meta = load_sweep(sweep_dir)
    lines = []
    for job in meta["jobs"]:
        word, _ = job_status(meta, job)
        if word not in ("pending", "running", "requeued"):
            continue
        if meta.get("executor") == "local":
            if job.get("job_id") is None:  # not started yet: the sweep skips it
                write_state(Path(job["state_file"]), state="cancelled", reason="cancelled by `bench sweep cancel`")
                _, meta = load_sweep(sweep_dir)  # unless it was started meanwhile
                job = next(j for j in meta["jobs"] if j["state_file"] == job["state_file"])
            if job.get("job_id") is not None:
                try:
                    os.kill(int(job["job_id"]), signal.SIGINT)  # the controller stops its task, which stops bench run
                except ProcessLookupError:
                    pass
        else:
            if shutil.which("scancel") is None:
                raise BenchError("no scancel on this machine; cancel from a Slurm login node")
            submitit.SlurmJob(folder=meta["submitit_folder"], job_id=str(job["job_id"])).cancel(check=False)
        write_state(Path(job["state_file"]), state="cancelled", reason="cancelled by `bench sweep cancel`")
        lines.append(f"cancelled {job['row']} seed {job['seed']} (job {job['job_id']})")
    return lines or [f"nothing to cancel in {sweep_dir}: no job is pending or running"]
