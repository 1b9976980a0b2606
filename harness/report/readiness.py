"""Whether a row can run here and count, found in seconds instead of hours into a run: the checks of `bench doctor`,
which `bench run` (on Cityscapes) and `bench sweep` (before submitting) also run.

Each check is go, no-go, unknown (nothing to judge by) or info, with one line of detail and one of fix:
- dataset: the tree is there and complete, from file names (harness.data.check.list_tree: splits, official
  counts and cities, every image with its label) and each file's two ends (harness.data.check.cut_files: a PNG
  signature and header first, its end chunk last; a file cut short by a copy fails);
- starting weights: each file the row expects is here with its published checksum (harness.models.provenance);
- batch: the global batch divides over the processes;
- GPU memory: the row's crop at the per-GPU batch fits the device, from a `bench speed` record of that device
  (its peak at the recorded batch, the per-image part scaled to the per-GPU batch), else a short measured
  training step on this machine's GPU, else an estimate (the model's state and the activations a training step
  keeps, counted on the meta device) against the device's memory (its record, or the GPU catalogue's);
- disk: room under the runs folder for the row's checkpoints (one checkpoint's size times the files the row keeps:
  the periodic ones, best.pt, and the next one being written);
- tracking store: reachable, and fit for the number of processes writing to it at once (one SQLite file is not,
  for jobs on several nodes: "database is locked");
- wall time: the estimate `bench plan` gives.
"""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass
from typing import Any, Optional

from harness import paths
from harness.config.benchmark import REFERENCE_DATASET, dataset_name
from harness.config.plan import batch_split_problem, dataset_batch, loss_group_images
from harness.config.spec import Spec, load_spec, training_row
from harness.errors import BenchError
from harness.files import existing_parent
from harness.models.provenance import MISSING
from harness.models.weights import checked_files, weights_folder_problem
from harness.report.records import SpeedRecord

GO, NO_GO, UNKNOWN, INFO = "go", "no-go", "unknown", "info"
MEMORY_HEADROOM = 0.95  # share of the device's memory a run may plan to use (the allocator and CUDA context need some)
SHOWN_DEFECTS = 3


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
    device: Optional[str] = None  # the GPU figures are for (harness.report.estimates.resolve_device); default: this GPU
    tracking_uri: Optional[str] = None
    writers: int = 1  # processes that may write to the tracking store at once
    probe: bool = True  # measure a training step on this machine's GPU when no record says
    estimate: bool = True  # else estimate the memory a training step needs (counted on the meta device)
    iters: Optional[int] = None

    @property
    def processes(self) -> int:
        return self.gpus * self.nodes

    @property
    def dataset(self) -> str:
        return dataset_name(self.synthetic)


# --- the checks ---------------------------------------------------------------------------------


def check_dataset(options: DoctorOptions) -> Check:
    from harness.data.check import RULES, cut_files, list_tree
    from harness.data.source import cityscapes_root

    if options.synthetic:
        return Check("dataset", GO, "the synthetic dataset (generated on first use)")
    try:
        root = cityscapes_root(options.data_root)
    except BenchError as exc:
        return Check("dataset", NO_GO, str(exc), "give the Cityscapes root (leftImg8bit/ and gtFine/ inside)")
    listing = list_tree(root)
    report = listing.report
    defects = report.defects + cut_files(listing)
    if not defects and report.rule == "synthetic":  # the message says the rule applied, never the official one
        images = ", ".join(f"{s.images} {s.split}" for s in report.splits if s.images)
        return Check("dataset", GO, f"{root}: the synthetic dataset ({images} images), complete by its own rule "
                                    f"({RULES[report.rule]}); a run on it proves the pipeline, it never counts")
    if not defects:
        return Check("dataset", GO, f"{root}: every official split, city and label present, each file a whole PNG "
                                    "at both ends")
    shown = "; ".join(f"{d.split}: {d.kind}: {d.detail}" for d in defects[:SHOWN_DEFECTS])
    more = f" (+{len(defects) - SHOWN_DEFECTS} more)" if len(defects) > SHOWN_DEFECTS else ""
    return Check("dataset", NO_GO, f"{root}: {len(defects)} defect(s): {shown}{more}",
                 f"`bench data check --data-root {root}` lists them; unpack the official gtFine_trainvaltest and "
                 "leftImg8bit_trainvaltest packages whole")


def check_weights(spec: Spec, options: DoctorOptions) -> list[Check]:
    files = checked_files(spec, contents=True)
    if not files:
        return [Check("starting weights", GO, "none expected: random initialisation, as the table's run")]
    checks = []
    for path, checked in files:
        where = checked.source.where if checked.source else "the file the spec names"
        verdict = INFO if options.synthetic else NO_GO  # a synthetic run proves the pipeline, it never counts
        if checked.status == MISSING:
            problem = weights_folder_problem()
            detail = f"{path} is missing" + (f" ({problem})" if problem else "")
            checks.append(Check("starting weights", verdict, detail,
                                f"bring it from {where} (or set $SEGBENCH_WEIGHTS)"))
        elif checked.unusable:
            checks.append(Check("starting weights", verdict, f"{path}: {checked.describe()}",
                                f"fetch the published file again from {where}"))
        else:
            checks.append(Check("starting weights", GO, f"{path}: {checked.describe()}"))
    return checks


def check_batch(spec: Spec, options: DoctorOptions) -> Check:
    _, batch = dataset_batch(spec, options.synthetic)
    processes = options.processes
    problem = batch_split_problem(batch, processes)
    if problem:
        return Check("batch", NO_GO, *problem)
    return Check("batch", GO, f"global batch {batch} over {processes} process(es): {batch // processes} per GPU")


def state_sizes(spec: Spec) -> tuple[int, int]:
    """(bytes of the model's state dict, bytes of its parameters), counted on the meta device once."""
    from harness.report.model_costs import model_costs

    return model_costs().state_sizes(spec)


def checkpoint_bytes(spec: Spec) -> int:
    """One training checkpoint: the model, the EMA copy on EMA rows, SGD's momentum (one tensor per parameter),
    and a little for the rest (schedule, RNG, plan)."""
    state, params = state_sizes(spec)
    return state * (2 if spec.columns.ema else 1) + params + (1 << 20)


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


def newest_train_entry(spec: Spec, device: str) -> Optional[tuple[SpeedRecord, dict[str, Any]]]:
    """(record, train entry) of the newest speed record of the row (or its base row) at its crop on `device` (a
    catalogue GPU by any of its names)."""
    from harness.config.spec import base_row
    from harness.report.estimates import speed_records, target_of

    target = target_of(device)
    rows = {spec.row, base_row(spec.row)}
    for record in reversed(speed_records()):
        entry = record.modes.get("train")
        if target.owns(record.device) and record.row in rows and entry \
                and entry["peak_memory_gib"] is not None and list(entry["size"]) == list(spec.train.crop_size):
            return record, entry
    return None


def local_gpu(device: Optional[str]) -> Optional[Any]:
    """This machine's first GPU, when it is the device asked about (or none was named)."""
    from harness.config.devices import find_gpu
    from harness.report.estimates import this_gpu

    here = this_gpu()
    if here is None:
        return None
    if device is not None and device != here and (find_gpu(device) is None or find_gpu(device) is not find_gpu(here)):
        return None
    import torch

    return torch.device("cuda", 0)


def fixed_memory_gib(spec: Spec) -> float:
    """What a training process holds whatever its batch: the weights, the EMA copy, the gradients, SGD's momentum."""
    state, params = state_sizes(spec)
    return (state * (2 if spec.columns.ema else 1) + 2 * params) / 2**30


def estimate_memory(spec: Spec, per_gpu: int) -> tuple[float, float]:
    """(GiB, GiB with activations in 16 bits) a training step of `per_gpu` crops needs: `fixed_memory_gib` plus the
    activations autograd keeps for the backward, counted in fp32 on the meta device (a bf16 or fp16 run keeps most
    of them in 16 bits: the second figure)."""
    from harness.report.model_costs import model_costs

    saved = model_costs().training(spec, *map(int, spec.train.crop_size)).saved_bytes * per_gpu / 2**30
    fixed = fixed_memory_gib(spec)
    return fixed + saved, fixed + saved / 2


def check_memory(spec: Spec, options: DoctorOptions) -> Check:
    if options.synthetic:
        return Check("GPU memory", INFO, "not checked for the synthetic budget (small crops)")
    _, batch = dataset_batch(spec, synthetic=False)
    if batch_split_problem(batch, options.processes):
        return Check("GPU memory", UNKNOWN, "no per-GPU batch (the batch does not divide)")
    per_gpu, crop = batch // options.processes, spec.train.crop_size
    here = local_gpu(options.device)
    from harness.config.devices import find_gpu
    from harness.engine.device import device_memory_gib, device_name

    device = options.device or (device_name(here) if here is not None else None)
    if device is None:
        return Check("GPU memory", UNKNOWN, "no GPU on this machine and no --device named",
                     "pass --device NAME (e.g. h100, a100-80gb), or run on the GPU")
    gpu = find_gpu(device)
    total = device_memory_gib(here) if here is not None else None
    found = newest_train_entry(spec, device)
    estimated = None
    if found is not None:
        record, entry = found
        total = total or record.device_memory_gib
        fixed = fixed_memory_gib(spec)
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
    elif not options.estimate:
        return Check("GPU memory", UNKNOWN, f"no bench speed record of {spec.row} at its crop on {device}",
                     f"`bench speed --row {spec.row} --mode train` on that device records it")
    else:
        need, estimated = estimate_memory(spec, per_gpu)
        how = (f"{need:.1f} GiB at {per_gpu} x {crop[0]}x{crop[1]} (estimated: state and fp32 activations counted "
               f"on the meta device; {estimated:.1f} GiB with 16-bit activations)")
    if total is None and gpu is not None:
        total, what = gpu.memory_gib, f"{gpu.name} has {gpu.memory_gib:g} GB (source: {gpu.source})"
    else:
        what = f"{device} has {total:.1f} GiB" if total is not None else ""
    if total is None:
        return Check("GPU memory", UNKNOWN, f"{how}; the memory of {device} is not recorded",
                     "re-record with `bench speed` (records now keep the device's memory), or name a catalogue GPU")
    detail = f"{how}; {what}"
    measure = f"`bench speed --row {spec.row} --mode train` on the device measures it"
    if need > MEMORY_HEADROOM * total:
        if estimated is not None and estimated <= MEMORY_HEADROOM * total:
            return Check("GPU memory", UNKNOWN, detail + "; fits only if most activations are 16-bit", measure)
        return Check("GPU memory", NO_GO, detail, "use more GPUs (a smaller per-GPU batch) or a larger GPU"
                     + (f"; {measure}" if estimated is not None else ""))
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

    plan = make_plan(spec, REFERENCE_DATASET, OFFICIAL_SPLIT_IMAGES["train"],
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


def check_outputs(options: DoctorOptions) -> Check:
    """The run and results folders take new files: the check `bench run` starts with, asked without creating them."""
    from harness.report.records import check_output_folders

    try:
        check_output_folders(options.dataset, create=False)
    except BenchError as exc:
        detail, _, fix = str(exc).partition("; ")
        return Check("output folders", NO_GO, detail, fix)
    return Check("output folders", GO, f"{paths.runs_dir() / options.dataset} and "
                                       f"{paths.results_dir() / options.dataset} take new files")


def check_tracking(options: DoctorOptions) -> Check:
    """The tracking store, as the backend serving its URI sees it (harness.tracking.backends)."""
    from harness.tracking.backends import check_store

    uri = options.tracking_uri or paths.default_tracking_uri()
    try:
        found = check_store(uri, options.writers)
    except BenchError as exc:
        return Check("tracking store", NO_GO, str(exc), "pass another --tracking-uri")
    verdict = {True: GO, False: NO_GO, None: UNKNOWN}[found.ok]
    return Check("tracking store", verdict, found.detail, found.fix)


def check_time(spec: Spec, options: DoctorOptions) -> Check:
    from harness.report.estimates import Rates, hours, resolve_device, row_cost

    if options.synthetic:
        return Check("wall time", INFO, "the synthetic budget: minutes on a CPU")
    rates = Rates(resolve_device(options.device))
    cost = row_cost(spec, rates, options.processes, iterations=options.iters)
    if cost.gpu_hours is None:
        return Check("wall time", UNKNOWN, cost.label, f"`bench speed --row {spec.row}` on the device")
    return Check("wall time", INFO, f"{hours(cost.wall_hours)} on {options.processes} GPU(s) "
                                    f"({cost.gpu_hours:,.1f} GPU-hours; {cost.label})")


def run_checks(options: DoctorOptions, quick: bool = False) -> list[Check]:
    """Every check of the row (`quick`: only those a starting `bench run` adds to its own: the dataset, the disk
    and a recorded memory figure; no probe, no store, no estimate)."""
    spec = load_spec(options.row)
    if not quick and (options.device is not None or not options.synthetic):
        from harness.report.estimates import resolve_device

        # The GPU the figures are for, told (or refused, in one line) before any check runs.
        options = dataclasses.replace(options, device=resolve_device(options.device).name)
    if quick:
        options = dataclasses.replace(options, probe=False, estimate=False)
        return [check_dataset(options), check_disk(spec, options), check_memory(spec, options)]
    return [check_dataset(options), *check_weights(spec, options), check_batch(spec, options),
            check_memory(spec, options), check_disk(spec, options), check_outputs(options), check_tracking(options),
            check_time(spec, options)]


@dataclass
class DoctorReport:
    checks: list[Check]

    @property
    def text(self) -> str:
        return render(self.checks)

    @property
    def exit_code(self) -> int:
        """1 on any no-go: a script stops before the expensive run."""
        return 1 if any(c.no_go for c in self.checks) else 0


def doctor(options: DoctorOptions) -> DoctorReport:
    """`bench doctor`: the checks, their table and the exit code; a light-seg row is checked as the row it trains."""
    if options.gpus < 1 or options.nodes < 1 or options.writers < 1:
        raise BenchError(f"--gpus, --nodes and --writers must be at least 1 (got {options.gpus}, {options.nodes}, "
                         f"{options.writers})")
    if options.synthetic and options.data_root:
        raise BenchError("--synthetic and --data-root exclude each other; pass one")
    row, _ = training_row(options.row)
    return DoctorReport(run_checks(dataclasses.replace(options, row=row)))


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
