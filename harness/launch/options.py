"""Option handling the commands share: the options of a training run, and the one place they are checked.

`validate_run` checks everything a `bench run` can be refused for before anything starts (every seed, the device
and precision, the spec, the dataset folder, the starting checkpoint, a starting-weight file whose SHA-1 is not the
published one in a run that could count, the batch over the processes, batch norm at one image per process or group, the
output folders), once, and hands back what it resolved (`CheckedRun`). Training takes
only a `CheckedRun`, so nothing trains unchecked and nothing is checked twice.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Optional

from harness.config.benchmark import dataset_name
from harness.config.plan import batch_per_process, dataset_batch, loss_group_images
from harness.config.precision import Compute, resolve_compute
from harness.config.spec import Spec, load_spec
from harness.data.source import check_data_options, cityscapes_root
from harness.errors import BenchError
from harness.report.records import check_output_folders

# PyTorch and the model families (seconds to import) load only after the cheap checks (check_before_loading): a
# misspelt row, a bad flag or a missing folder is answered within about a second.

SEED_MAX = 2**32 - 1  # numpy's seed range; torch and random accept it too


@dataclass
class RunOptions:
    """What `bench run` was asked for (before resolution)."""

    row: str
    synthetic: bool = False
    data_root: Optional[str] = None
    iters: Optional[int] = None
    seed: int = 0
    tracking_uri: Optional[str] = None
    device: Optional[str] = None
    precision: Optional[str] = None
    channels_last: Optional[bool] = None  # default: the device's (harness.config.precision.Compute); not the recipe
    fused: Optional[bool] = None  # the fused SGD kernel; default: the device's; not the recipe
    resume: Optional[str] = None  # "latest", a run folder, or a checkpoint file
    deterministic: bool = False
    init_checkpoint: Optional[str] = None
    eval_every: Optional[int] = None  # iterations; overrides the recipe's cadence
    compile: bool = False  # torch.compile the model (not part of the recipe: a resumed run may change it)
    decoded_cache: Optional[str] = None  # a folder of decoded frames (harness.data.decoded), built when missing
    offline_tracking: bool = False  # journal locally only; `bench sync` logs the run to the store later
    progress: bool = True
    # Stop at the first evaluation more than this many mIoU points (or 3 x their spread) behind earlier runs.
    stop_if_behind: Optional[float] = None
    no_system_metrics: bool = False  # MLflow's CPU, memory, disk, network (and GPU) metrics are logged unless set

    @property
    def dataset(self) -> str:
        return dataset_name(self.synthetic)


@dataclass(frozen=True)
class LaunchOptions:
    """How many processes train: `gpus` per node (torchrun) on `nnodes` nodes."""

    gpus: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: Optional[str] = None
    master_port: Optional[int] = None

    @property
    def processes(self) -> int:
        return self.gpus * self.nnodes


@dataclass(frozen=True)
class CheckedRun:
    """A `bench run` that passed every check, with what the checks resolved."""

    options: RunOptions
    seeds: tuple[int, ...]
    spec: Spec
    device_type: str
    compute: Compute  # the precision (the recipe's), the memory format and optimizer kernel
    processes: int
    per_rank_batch: int
    init_checkpoint: Optional[Path]


def check_seed(seed: int, flag: str = "--seed") -> None:
    if not 0 <= seed <= SEED_MAX:
        raise BenchError(f"{flag} {seed}: accepted 0 to {SEED_MAX}")


def parse_seeds(text: str) -> list[int]:
    """`--seeds 0,1,2`: distinct integers in the seed range, run in the order given."""
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise BenchError(f"--seeds {text!r}: give integers separated by commas, e.g. --seeds 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise BenchError(f"--seeds {text!r}: give distinct integers separated by commas, e.g. --seeds 0,1,2")
    for seed in seeds:
        check_seed(seed, f"--seeds {text}: seed")
    return seeds


def run_seeds(seed: int, seeds_text: Optional[str], resume: Optional[str]) -> list[int]:
    """The seeds of `bench run`: `--seed`, or the list `--seeds` gives (one new run each, so no --resume)."""
    if seeds_text is None:
        return [seed]
    if seed != 0 or resume:
        raise BenchError("--seeds starts one new run per seed: drop --seed and --resume (or run one --seed)")
    return parse_seeds(seeds_text)


def check_counts(iters: Optional[int], eval_every: Optional[int]) -> None:
    if iters is not None and iters < 1:
        raise BenchError(f"--iters must be at least 1, got {iters}")
    if eval_every is not None and eval_every < 0:
        raise BenchError(f"--eval-every must be 0 (only at the end) or a positive number of iterations, got "
                         f"{eval_every}")


def check_options(options: RunOptions, seeds: Sequence[int] = ()) -> None:
    """Command-line values that cannot run: one line naming the option, the value and what is accepted."""
    from harness.engine.device import check_device_name

    for seed in seeds or (options.seed,):
        check_seed(seed)
    check_device_name(options.device)
    check_counts(options.iters, options.eval_every)
    check_data_options(options.synthetic, options.data_root)
    behind = options.stop_if_behind
    if behind is not None and not (0 <= behind < 100):  # NaN fails this too
        raise BenchError(f"--stop-if-behind {behind}: give mIoU points from 0 to 100 (e.g. --stop-if-behind 2), or "
                         "the bare flag for the default")


def check_before_loading(options: RunOptions, seeds: Sequence[int], processes: int) -> None:
    """The checks that need neither PyTorch nor a network (the process count, the seeds and counts, the row, the
    data folder), before either loads; validate_run makes them again with the rest."""
    if processes < 1:
        raise BenchError(f"--gpus and --nnodes must be at least 1 (got {processes} processes)")
    for seed in seeds or (options.seed,):
        check_seed(seed)
    check_counts(options.iters, options.eval_every)
    check_data_options(options.synthetic, options.data_root)
    load_spec(options.row)
    if not options.resume:  # a resumed run takes its data folder from the run it continues
        check_data_root(options)


def check_data_root(options: RunOptions) -> None:
    """The Cityscapes folder of a non-synthetic run exists (named before any launch)."""
    if not options.synthetic:
        cityscapes_root(options.data_root)


def check_batch_norm(spec: Spec, batch_key: str, batch: int, crop_key: str, crop: list[int], per_rank: int,
                     processes: int, device_type: str, group_images: int) -> None:
    """One image per process: a batch norm after global pooling sees one value per channel, and training fails
    at its first step. A forward on the meta device (shapes only, no compute) finds such a layer up front.
    SyncBatchNorm (several processes on GPUs) normalises over all processes; the layers UP normalised per GPU
    (GroupedBatchNorm2d) normalise over groups of `group_images` of a process's images, whatever the device."""
    from harness.models import build_model
    from harness.models.common import GroupedBatchNorm2d

    per_group = group_images if group_images and per_rank // group_images > 1 else per_rank
    plain_single = per_rank == 1 and not (processes > 1 and device_type == "cuda")
    if spec.train.freeze_bn or not (plain_single or per_group == 1):
        return
    import torch

    single: list[tuple[str, bool]] = []  # (layer, normalised per UP GPU group)
    try:
        with torch.device("meta"):
            model = build_model(spec)
        for name, module in model.named_modules():
            if not isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                continue
            if not (per_group == 1 if isinstance(module, GroupedBatchNorm2d) else plain_single):
                continue
            module.register_forward_pre_hook(
                lambda m, args, name=name: single.append((name, isinstance(m, GroupedBatchNorm2d)))
                if args[0].numel() == args[0].shape[1] else None)
        model.train()(torch.empty(1, 3, crop[1], crop[0], device="meta"))
    except Exception:  # the probe only looks for this one failure; the run itself reports anything else
        pass
    if single:
        layer, grouped = single[0]
        where = f"({batch_key} {batch} over {processes} process(es)) at {crop_key} {crop}: batch norm {layer}"
        if grouped:
            raise BenchError(f"{spec.row}: 1 image per group {where}, which UP normalised per GPU (its {group_images} "
                             "image(s)), would see one value per channel; use fewer processes or a larger batch")
        raise BenchError(
            f"{spec.row}: 1 image per process {where} would see one value per channel; use fewer processes or a larger "
            f"batch (or crop), or GPUs, whose SyncBatchNorm normalises over all processes")


def check_starting_weights(spec: Spec, options: RunOptions, init_checkpoint: Optional[Path]) -> None:
    """A run that could count (Cityscapes, the full budget, a new run) refuses a starting-weight file whose SHA-1 is
    not the published one: it would train for days and then not count."""
    if options.synthetic or options.iters is not None or options.resume:
        return
    from harness.models.weights import checked_files

    if init_checkpoint is not None:
        spec = replace(spec, model=replace(spec.model, init_checkpoint=str(init_checkpoint)))
    for path, checked in checked_files(spec):
        if checked.mismatch and checked.source is not None:
            raise BenchError(f"{path}: {checked.describe()}, not the file {spec.row} expects ({checked.source.where}); "
                             "a counted run refuses it: fetch the published file (`bench weights --verify`), or pass "
                             "--iters N to train on it anyway (recorded as other starting weights)")


def validate_run(options: RunOptions, seeds: Sequence[int], processes: int, *, check_outputs: bool = True
                 ) -> CheckedRun:
    """Every check of a `bench run`, before anything starts; returns what they resolved."""
    if processes < 1:
        raise BenchError(f"--gpus and --nnodes must be at least 1 (got {processes} processes)")
    from harness.engine.device import default_device_type
    from harness.models import check_implemented

    check_options(options, seeds)
    spec = load_spec(options.row)
    check_implemented(spec)
    check_data_root(options)
    init_checkpoint = None
    if options.init_checkpoint:
        init_checkpoint = Path(options.init_checkpoint).expanduser().resolve()
        if not init_checkpoint.is_file():
            raise BenchError(f"--init-checkpoint {init_checkpoint} does not exist; give the path of a model "
                             "checkpoint file")
    check_starting_weights(spec, options, init_checkpoint)
    device_type = default_device_type(options.device)
    compute = resolve_compute(device_type, options.precision, options.channels_last, options.fused)
    synthetic = options.synthetic
    batch_key, batch = dataset_batch(spec, synthetic)
    crop_key, crop = ("synthetic.crop_size", spec.synthetic.crop_size) if synthetic else \
        ("train.crop_size", spec.train.crop_size)
    per_rank = batch_per_process(batch, processes)
    check_batch_norm(spec, batch_key, batch, crop_key, crop, per_rank, processes, device_type,
                     loss_group_images(spec, synthetic))
    if check_outputs:
        check_output_folders(options.dataset)
    return CheckedRun(options, tuple(seeds), spec, device_type, compute, processes, per_rank, init_checkpoint)


def worker_argv(options: RunOptions, seeds: Sequence[int]) -> list[str]:
    """The `bench run` command line that trains exactly `options` for each of `seeds`, rebuilt from the parsed
    options (a torchrun worker or a sweep job trains what this process validated, whatever spelling was typed)."""
    argv = ["run", "--row", options.row]
    for option in fields(RunOptions):
        value = getattr(options, option.name)
        if option.name in ("row", "seed", "progress") or value == option.default:
            continue
        flag = "--" + option.name.replace("_", "-")
        if isinstance(value, bool):  # a flag, or one of an on/off pair (--fused/--no-fused) set off
            argv += [flag if value else "--no-" + flag[2:]]
        else:
            argv += [flag, str(value)]
    return argv + (["--seeds", ",".join(map(str, seeds))] if len(seeds) > 1 else ["--seed", str(seeds[0])])


def parse_size(text: Optional[str]) -> Optional[tuple[int, int]]:
    """'W,H' (or WxH) -> (width, height)."""
    if text is None:
        return None
    parts = re.split(r"[,x]", text.strip())
    if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise BenchError(f"--size {text}: give WIDTH,HEIGHT, two positive integers, e.g. --size 256,128")
    return int(parts[0]), int(parts[1])
