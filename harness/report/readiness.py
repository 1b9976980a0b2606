"""Whether a row can run here and count, found in seconds instead of hours into a run: the checks of `bench doctor`,
which `bench run` (on Cityscapes) and `bench sweep` (before submitting) also run.

Each check is go, no-go, unknown (nothing to judge by) or info, with one line of detail and one of fix:
- dataset: the tree is there and complete, from file names alone (harness.data.check.list_tree: splits, official
  counts and cities, every image with its label);
- starting weights: each file the row expects is here with its published checksum (harness.models.provenance);
- batch: the global batch divides over the processes;
- GPU memory: the row's crop at the per-GPU batch fits the device, from a `bench speed` record of that device
  (its peak at the recorded batch, the per-image part scaled to the per-GPU batch), else a short measured
  training step on this machine's GPU, else unknown;
- disk: room under the runs folder for the row's checkpoints (one checkpoint's size times the files the row keeps:
  the periodic ones, best.pt, and the next one being written);
- tracking store: reachable, and fit for the number of processes writing to it at once (one SQLite file is not,
  for jobs on several nodes: "database is locked");
- wall time: the estimate `bench plan` gives.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sqlite3
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from harness import paths
from harness.config.plan import loss_group_images
from harness.config.spec import Spec, load_spec
from harness.errors import BenchError
from harness.models.provenance import CHECKSUM_MISMATCH, MISSING, check_file
from harness.models.weights import expected_files

GO, NO_GO, UNKNOWN, INFO = "go", "no-go", "unknown", "info"
MEMORY_HEADROOM = 0.95  # share of the device's memory a run may plan to use (the allocator and CUDA context need some)
SHOWN_DEFECTS = 3
TRACKING_TIMEOUT_S = 5.0


@dataclass
class Check:
    name: str
    verdict: str
    detail: str
    fix: str = ""

    @property
    def no_go(self) -> bool:
        return self.verdict == NO_GO

    def line(self) -> str:
        """The check in one line, as a run or a sweep reports a no-go."""
        return f"{self.name}: {self.detail}" + (f"; fix: {self.fix}" if self.fix else "")


@dataclass
class DoctorOptions:
    row: str
    gpus: int = 1  # processes per node
    nodes: int = 1
    data_root: Optional[str] = None
    synthetic: bool = False
    device: Optional[str] = None  # the device figures are for (a `bench speed` device name); default: this GPU
    tracking_uri: Optional[str] = None
    writers: int = 1  # processes that may write to the tracking store at once
    probe: bool = True  # measure a training step on this machine's GPU when no record says
    iters: Optional[int] = None

    @property
    def processes(self) -> int:
        return self.gpus * self.nodes

    @property
    def dataset(self) -> str:
        return "synthetic" if self.synthetic else "cityscapes"


# --- the checks ---------------------------------------------------------------------------------


def check_dataset(options: DoctorOptions) -> Check:
    from harness.data.check import RULES, list_tree, resolve_root

    if options.synthetic:
        return Check("dataset", GO, "the synthetic dataset (generated on first use)")
    try:
        root = resolve_root(options.data_root)
    except BenchError as exc:
        return Check("dataset", NO_GO, str(exc), "give the Cityscapes root (leftImg8bit/ and gtFine/ inside)")
    report = list_tree(root).report
    defects = report.defects
    if not defects and report.rule == "synthetic":  # the message says the rule applied, never the official one
        images = ", ".join(f"{s.images} {s.split}" for s in report.splits if s.images)
        return Check("dataset", GO, f"{root}: the synthetic dataset ({images} images), complete by its own rule "
                                    f"({RULES[report.rule]}); a run on it proves the pipeline, it never counts")
    if not defects:
        return Check("dataset", GO, f"{root}: every official split, city and label present")
    shown = "; ".join(f"{d.split}: {d.kind}: {d.detail}" for d in defects[:SHOWN_DEFECTS])
    more = f" (+{len(defects) - SHOWN_DEFECTS} more)" if len(defects) > SHOWN_DEFECTS else ""
    return Check("dataset", NO_GO, f"{root}: {len(defects)} defect(s): {shown}{more}",
                 f"`bench data check --data-root {root}` lists them; unpack the official gtFine_trainvaltest and "
                 "leftImg8bit_trainvaltest packages whole")


def check_weights(spec: Spec, options: DoctorOptions) -> list[Check]:
    files = expected_files(spec)
    if not files:
        return [Check("starting weights", GO, "none expected: random initialisation, as the table's run")]
    checks = []
    for _, path in files:
        checked = check_file(path)
        where = checked.source.where if checked.source else "the file the spec names"
        verdict = INFO if options.synthetic else NO_GO  # a synthetic run proves the pipeline, it never counts
        if checked.status == MISSING:
            checks.append(Check("starting weights", verdict, f"{path} is missing",
                                f"bring it from {where} (or set $SEGBENCH_WEIGHTS)"))
        elif checked.status == CHECKSUM_MISMATCH:
            checks.append(Check("starting weights", verdict, f"{path}: {checked.describe()}",
                                f"fetch the published file again from {where}"))
        else:
            checks.append(Check("starting weights", GO, f"{path}: {checked.describe()}"))
    return checks


def check_batch(spec: Spec, options: DoctorOptions) -> Check:
    batch = spec.synthetic.batch_size if options.synthetic else spec.columns.batch_size
    processes = options.processes
    if batch % processes:
        divisors = [n for n in range(1, batch + 1) if batch % n == 0]
        return Check("batch", NO_GO, f"global batch {batch} does not divide over {processes} process(es)",
                     f"use a process count among {', '.join(map(str, divisors))} (the global batch is the spec's)")
    return Check("batch", GO, f"global batch {batch} over {processes} process(es): {batch // processes} per GPU")


def state_sizes(spec: Spec) -> tuple[int, int]:
    """(bytes of the model's state dict, bytes of its parameters), counted on the meta device."""
    from harness.models.sizes import meta_model, state_bytes

    return state_bytes(meta_model(spec))


def checkpoint_bytes(spec: Spec) -> int:
    """One training checkpoint: the model, the EMA copy on EMA rows, SGD's momentum (one tensor per parameter),
    and a little for the rest (schedule, RNG, plan)."""
    state, params = state_sizes(spec)
    return state * (2 if spec.columns.ema else 1) + params + (1 << 20)


def existing_parent(path: Path) -> Path:
    path = path.expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def gib(value: float) -> str:
    return f"{value / 2**30:.2f} GiB"


def check_disk(spec: Spec, options: DoctorOptions) -> Check:
    folder = paths.runs_dir() / options.dataset / spec.row
    files = spec.train.keep_checkpoints + 2  # the periodic ones, best.pt, and the next one being written
    needed = files * checkpoint_bytes(spec)
    where = existing_parent(folder)
    try:
        free = shutil.disk_usage(where).free
    except OSError as exc:
        return Check("disk", NO_GO, f"cannot read the free space of {where} ({exc.strerror or exc})",
                     "make the runs folder reachable, or set SEGBENCH_RUNS to another folder")
    detail = (f"{gib(needed)} for {files} checkpoints of {gib(needed / files)} (train.keep_checkpoints "
              f"{spec.train.keep_checkpoints} + best.pt + the next write) under {folder}; {gib(free)} free")
    if free < needed:
        return Check("disk", NO_GO, detail, "free space there, or set SEGBENCH_RUNS to a larger filesystem")
    return Check("disk", GO, detail)


def newest_train_entry(spec: Spec, device: str) -> Optional[tuple[dict[str, Any], dict[str, Any]]]:
    """(record, train entry) of the newest speed record of the row (or its base row) at its crop on `device`."""
    from harness.config.spec import base_row
    from harness.report.estimates import speed_records

    rows = {spec.row, base_row(spec.row)}
    for record in reversed(speed_records(device)):
        entry = (record.get("modes") or {}).get("train")
        if record.get("row") in rows and entry and entry.get("peak_memory_gib") is not None \
                and list(entry.get("size") or []) == list(spec.train.crop_size):
            return record, entry
    return None


def local_gpu(device: Optional[str]) -> Optional[Any]:
    """This machine's first GPU, when it is the device asked about (or none was named)."""
    import torch

    from harness.engine.device import device_name

    if not torch.cuda.is_available():
        return None
    here = torch.device("cuda", 0)
    return here if device in (None, device_name(here)) else None


def check_memory(spec: Spec, options: DoctorOptions) -> Check:
    if options.synthetic:
        return Check("GPU memory", INFO, "not checked for the synthetic budget (small crops)")
    batch = spec.columns.batch_size
    if batch % options.processes:
        return Check("GPU memory", UNKNOWN, "no per-GPU batch (the batch does not divide)")
    per_gpu, crop = batch // options.processes, spec.train.crop_size
    here = local_gpu(options.device)
    from harness.engine.device import device_memory_gib, device_name

    device = options.device or (device_name(here) if here is not None else None)
    if device is None:
        return Check("GPU memory", UNKNOWN, "no GPU on this machine and no --device named",
                     "pass --device NAME (a device with `bench speed` records, e.g. nvidia-h200), or run on the GPU")
    total = device_memory_gib(here) if here is not None else None
    found = newest_train_entry(spec, device)
    if found is not None:
        record, entry = found
        total = total or record.get("device_memory_gib")
        state, params = state_sizes(spec)
        fixed = (state * (2 if spec.columns.ema else 1) + 2 * params) / 2**30  # weights, EMA, gradients, momentum
        peak, recorded_batch = float(entry["peak_memory_gib"]), int(entry["batch"])
        need = fixed + max(0.0, peak - fixed) * per_gpu / recorded_batch
        how = (f"{need:.1f} GiB at {per_gpu} x {crop[0]}x{crop[1]} (from a bench speed record: {peak:.1f} GiB at "
               f"batch {recorded_batch})")
    elif here is not None and options.probe:
        measured = probe_memory(spec, here, per_gpu)
        if measured is None:
            return Check("GPU memory", NO_GO, f"one training step of {per_gpu} x {crop[0]}x{crop[1]} ran out of "
                                              f"memory on {device}", "use more GPUs (a smaller per-GPU batch)")
        need, how = measured, f"{measured:.1f} GiB at {per_gpu} x {crop[0]}x{crop[1]} (measured: one training step)"
    else:
        return Check("GPU memory", UNKNOWN, f"no bench speed record of {spec.row} at its crop on {device}",
                     f"`bench speed --row {spec.row} --mode train` on that device records it")
    if total is None:
        return Check("GPU memory", UNKNOWN, f"{how}; the memory of {device} is not recorded",
                     "re-record with `bench speed` (records now keep the device's memory)")
    detail = f"{how}; {device} has {total:.1f} GiB"
    if need > MEMORY_HEADROOM * total:
        return Check("GPU memory", NO_GO, detail, "use more GPUs (a smaller per-GPU batch) or a larger GPU")
    return Check("GPU memory", GO, detail)


def probe_memory(spec: Spec, device: Any, per_gpu: int) -> Optional[float]:
    """Peak GiB of two training steps of the row's recipe at its crop and `per_gpu` images on `device` (the
    step `bench run` trains with); None when it runs out of memory."""
    import torch

    from harness.config.benchmark import OFFICIAL_SPLIT_IMAGES
    from harness.config.plan import make_plan
    from harness.config.precision import resolve_precision
    from harness.engine.device import peak_memory_gib, reset_peak_memory
    from harness.engine.distributed import World
    from harness.engine.train import Trainer
    from harness.models import build_model

    plan = make_plan(spec, "cityscapes", OFFICIAL_SPLIT_IMAGES["train"],
                     precision=resolve_precision(None, device.type))
    plan = dataclasses.replace(plan, batch_size=per_gpu, loss_group_images=loss_group_images(spec))
    width, height = spec.train.crop_size
    try:
        trainer = Trainer(plan, build_model(spec), device, World(), progress=False)
        trainer.set_train_mode()
        images = torch.randn(per_gpu, 3, height, width, device=device)
        labels = torch.randint(0, 19, (per_gpu, height, width), device=device)
        reset_peak_memory(device)
        for _ in range(2):
            trainer.train_step(images, labels)
        torch.cuda.synchronize(device)
        return peak_memory_gib(device)
    except torch.OutOfMemoryError:
        return None
    finally:
        torch.cuda.empty_cache()


def sqlite_path(uri: str) -> Path:
    return Path(uri.removeprefix("sqlite:///") if uri.startswith("sqlite:///") else uri.removeprefix("sqlite:"))


def check_tracking(options: DoctorOptions) -> Check:
    uri = options.tracking_uri or paths.default_tracking_uri()
    writers = options.writers
    if uri.startswith("tensorboard:"):
        folder = existing_parent(Path(uri.removeprefix("tensorboard:")))
        if not os.access(folder, os.W_OK):
            return Check("tracking store", NO_GO, f"{uri}: {folder} is not writable", "choose a writable folder")
        return Check("tracking store", GO, f"{uri}: event files under a writable folder, one folder per run")
    if uri.startswith("sqlite:"):
        path = sqlite_path(uri)
        if path.exists():
            try:
                with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=TRACKING_TIMEOUT_S) as db:
                    db.execute("select count(*) from sqlite_master").fetchone()
            except sqlite3.Error as exc:
                return Check("tracking store", NO_GO, f"{uri}: unreadable ({exc})",
                             "fix or move the file, or pass another --tracking-uri")
        elif not os.access(existing_parent(path.parent), os.W_OK):
            return Check("tracking store", NO_GO, f"{uri}: {path.parent} is not writable",
                         "choose a writable place for the store, or pass another --tracking-uri")
        if writers > 1:
            return Check("tracking store", NO_GO, f"{uri}: one SQLite file for {writers} jobs writing at once (on "
                                                  "several nodes: 'database is locked', a damaged store)",
                         "start an MLflow tracking server (`mlflow server` on PostgreSQL) and pass --tracking-uri "
                         "http://HOST:PORT")
        return Check("tracking store", GO, f"{uri}: a local SQLite file, fit for one writer")
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=TRACKING_TIMEOUT_S) as reply:
                ok = reply.status == 200
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            return Check("tracking store", NO_GO, f"{uri}: unreachable ({reason})",
                         "start the tracking server, or pass --offline-tracking and `bench sync` later")
        if not ok:
            return Check("tracking store", NO_GO, f"{uri}: /health did not answer 200", "check the server")
        return Check("tracking store", GO, f"{uri}: a tracking server, fit for {writers} concurrent writer(s)")
    folder = existing_parent(Path(uri.removeprefix("file://").removeprefix("file:")))
    if "://" not in uri or uri.startswith("file:"):
        if not os.access(folder, os.W_OK):
            return Check("tracking store", NO_GO, f"{uri}: {folder} is not writable", "choose a writable folder")
        return Check("tracking store", GO, f"{uri}: a file store (one folder per run)")
    return Check("tracking store", UNKNOWN, f"{uri}: not checked (a store only MLflow itself can reach)")


def check_time(spec: Spec, options: DoctorOptions) -> Check:
    from harness.report.estimates import Rates, choose_device, hours, row_cost

    if options.synthetic:
        return Check("wall time", INFO, "the synthetic budget: minutes on a CPU")
    rates = Rates(choose_device(options.device))
    cost = row_cost(spec, rates, options.processes, iterations=options.iters)
    if cost.gpu_hours is None:
        return Check("wall time", UNKNOWN, cost.label, f"`bench speed --row {spec.row}` on the device")
    return Check("wall time", INFO, f"{hours(cost.wall_hours)} on {options.processes} GPU(s) "
                                    f"({cost.gpu_hours:,.1f} GPU-hours; {cost.label})")


def run_checks(options: DoctorOptions, quick: bool = False) -> list[Check]:
    """Every check of the row (`quick`: only those a starting `bench run` adds to its own: the dataset, the disk
    and a recorded memory figure; no probe, no store, no estimate)."""
    spec = load_spec(options.row)
    if quick:
        options = dataclasses.replace(options, probe=False)
        return [check_dataset(options), check_disk(spec, options), check_memory(spec, options)]
    return [check_dataset(options), *check_weights(spec, options), check_batch(spec, options),
            check_memory(spec, options), check_disk(spec, options), check_tracking(options), check_time(spec, options)]


def render(checks: list[Check]) -> str:
    from tabulate import tabulate

    table = tabulate([[c.name, c.verdict, c.detail, c.fix or "-"] for c in checks],
                     headers=["check", "verdict", "detail", "fix"], disable_numparse=True)
    blocking = [c for c in checks if c.no_go]
    summary = (f"{len(blocking)} no-go: " + ", ".join(c.name for c in blocking)) if blocking else \
        "all go" + (" (some unknown)" if any(c.verdict == UNKNOWN for c in checks) else "")
    return f"{table}\n{summary}"


def sweep_checks(job_specs: list[Spec], options: DoctorOptions) -> list[Check]:
    """What `bench sweep` checks before submitting one job per entry of `job_specs` (a row once per seed): the
    dataset and the store once (`options.writers` concurrent writers), each row's weights, batch and memory, and the
    disk for every job's checkpoints together."""
    rows = list({spec.row: spec for spec in job_specs}.values())
    checks = [check_dataset(options), check_tracking(options)]
    for spec in rows:
        own = dataclasses.replace(options, row=spec.row, probe=False)
        checks += [*check_weights(spec, own), check_batch(spec, own), check_memory(spec, own)]
    if job_specs:
        needed = sum((spec.train.keep_checkpoints + 2) * checkpoint_bytes(spec) for spec in job_specs)
        where = existing_parent(paths.runs_dir())
        free = shutil.disk_usage(where).free
        detail = (f"{gib(needed)} for the checkpoints of {len(job_specs)} job(s) under {paths.runs_dir()}; "
                  f"{gib(free)} free")
        checks.append(Check("disk", NO_GO if free < needed else GO, detail,
                            "free space there, or set SEGBENCH_RUNS to a larger shared filesystem" if free < needed
                            else ""))
    return checks
