"""`bench speed`: how fast a row trains, infers and loads data on this machine, measured rather than guessed.

Each mode times one unit of work after a warm-up, synchronised with the device (CUDA events on a GPU,
perf_counter on the CPU), and reports the median over repeated runs:

- train: one optimizer step of the row's network with the row's loss (SegmentationLoss with the plan's
  settings), SGD, the GradScaler for fp16 and the EMA update of EMA rows, on random images at the crop size;
- infer: one whole-image eval-mode forward at the row's test size;
- eval: the evaluation loop itself (decoding workers, device-side resize and normalisation, the row's test mode,
  scoring on the device), one image at a time at the test size, and its share of the infer rate;
- data: one batch from the training loader (workers decoding frames, CityscapesTrain) on full-size images,
  generated at 2048x1024 when no dataset is given; as "data cached", the same loader reading decoded frames back
  from a decoded cache (harness.data.decoded); and, as "augment", the device turning such a batch into the
  training crops (harness.data.augment.TrainTransform).

Train and infer also run the same step as a plain fp32 NCHW eager loop (the torchvision-references way) in the
same process and report the ratio. FLOPs come from torch.utils.flop_counter (as `bench list --sizes`), and the
model-FLOP utilisation is taken against a matrix-multiply peak measured here (bf16 on a GPU, fp32 on the CPU).
A batch that does not fit is retried smaller, as timm's benchmark.py does.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import platform
import re
import resource
import statistics
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from harness.errors import BenchError
from harness.spec import Spec

MODES = ("train", "infer", "eval", "data")
CITYSCAPES_TRAIN_IMAGES = 2975  # only sets the plan's epoch length, which no timing uses
FULL_SIZE = (2048, 1024)  # a Cityscapes frame, [width, height]
GENERATED_IMAGES = 2  # distinct generated frames, cycled; decoding cost does not depend on which one


@dataclass
class SpeedOptions:
    row: str
    mode: str = "all"
    batch: Optional[int] = None  # default: the row's global batch (train, data), 1 (infer, as evaluation runs)
    precision: Optional[str] = None
    compile: bool = False
    device: Optional[str] = None
    size: Optional[tuple[int, int]] = None  # [width, height] for every mode; default: the row's sizes
    data_root: Optional[str] = None
    workers: Optional[int] = None  # default: the spec's train.workers
    warmup: Optional[int] = None
    repeats: Optional[int] = None
    steps: Optional[int] = None  # timed units per repeat
    plain: bool = True  # also time the plain fp32 NCHW eager loop


@dataclass
class Timing:
    batch: int
    step_s: float  # median over repeats
    steps_s: list[float]  # every repeat's time per step
    peak_memory_gib: Optional[float]

    @property
    def images_per_s(self) -> float:
        return self.batch / self.step_s


# --- timing -----------------------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Callable[[], Any], device: torch.device, warmup: int, repeats: int, steps: int) -> list[float]:
    """Seconds per call of `step`, one figure per repeat of `steps` calls, after `warmup` calls; on a GPU the
    calls are timed with CUDA events around the work queued, not the host's time to queue it."""
    for _ in range(warmup):
        step()
    synchronize(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(steps):
                step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000 / steps)
        else:
            began = time.perf_counter()
            for _ in range(steps):
                step()
            times.append((time.perf_counter() - began) / steps)
    return times


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float:
    """CUDA: the peak of allocated memory since the last reset. CPU: the process's peak resident set size since
    it started (the kernel keeps no resettable peak), so it covers everything this process did before."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or (isinstance(exc, RuntimeError) and "out of memory" in str(exc))


def with_batch_retry(measure: Callable[[int], Timing], batch: int, device: torch.device) -> Timing:
    """Run `measure(batch)`; on out-of-memory retry with timm's decay_batch_step (64, 48, 32, 24, 16, 12, ...)."""
    from timm.utils import decay_batch_step

    while batch > 0:
        try:
            return measure(batch)
        except Exception as exc:  # noqa: BLE001 - only out-of-memory is retried
            if not is_out_of_memory(exc):
                raise
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        batch = decay_batch_step(batch)
    raise BenchError("--batch: not even one image fits in the device's memory; use a smaller --size")


# --- FLOPs and the device's peak -----------------------------------------------------------------------------------


def meta_model(spec: Spec) -> nn.Module:
    """The row's network on the meta device (shapes only, as harness.models.sizes counts it)."""
    from harness.models.registry import build_model

    shapes_only = dataclasses.replace(spec, model=dataclasses.replace(spec.model, backbone_checkpoint=None,
                                                                       init_checkpoint=None))
    with torch.device("meta"):
        return build_model(shapes_only, 19)


def inference_flops(spec: Spec, width: int, height: int) -> int:
    """One eval-mode forward of one image: the figure `bench list --sizes` reports at the test size."""
    from harness.models.sizes import measure

    return measure(meta_model(spec), height, width).flops


def training_flops(spec: Spec, width: int, height: int) -> int:
    """Forward and backward of one image in train mode (auxiliary heads included), counted by the same
    torch.utils.flop_counter on the meta device; two images are pushed so batch norm sees a batch."""
    model = meta_model(spec).train()
    images = torch.zeros(2, 3, height, width, device="meta")
    with FlopCounterMode(display=False) as counter:
        outputs = model(images)
        outputs = (outputs,) if isinstance(outputs, torch.Tensor) else outputs
        sum(o.float().sum() for o in outputs).backward()
    return counter.get_total_flops() // 2


_PEAKS: dict[tuple[str, str], float] = {}


def matmul_peak_tflops(device: torch.device) -> tuple[float, str]:
    """The best of repeated square matrix multiplies on `device`: bf16 on a GPU, fp32 on the CPU (TFLOP/s)."""
    dtype, n, reps = (torch.bfloat16, 8192, 20) if device.type == "cuda" else (torch.float32, 2048, 3)
    key = (str(device), str(dtype))
    if key not in _PEAKS:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        times = time_steps(lambda: torch.mm(a, b), device, warmup=1, repeats=reps, steps=1)
        _PEAKS[key] = 2 * n**3 / min(times) / 1e12
        del a, b
    return _PEAKS[key], str(dtype).removeprefix("torch.")


def device_name(device: torch.device) -> str:
    """A folder-safe name of the device: the GPU's marketing name, or the CPU model."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or "cpu"
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    name = "cpu " + line.split(":", 1)[1]
                    break
        except OSError:
            pass
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or device.type


# --- the three modes ---------------------------------------------------------------------------------------------


@dataclass
class StepConfig:
    """How a step runs: the project's way (autocast precision, channels_last on a GPU, optional compile) or the
    plain fp32 NCHW eager way."""

    precision: str
    channels_last: bool
    compile: bool

    @property
    def autocast_dtype(self) -> Optional[torch.dtype]:
        from harness.train import PRECISIONS

        return PRECISIONS[self.precision]


def build_for_timing(spec: Spec, device: torch.device, config: StepConfig) -> tuple[nn.Module, nn.Module]:
    """(the module, the callable that runs it): random weights, the timing does not depend on them."""
    from harness.models.registry import build_model

    model = build_model(spec).to(device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, (torch.compile(model) if config.compile else model)


def random_batch(batch: int, width: int, height: int, device: torch.device, channels_last: bool,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.randn(batch, 3, height, width, generator=generator).to(device)
    labels = torch.randint(0, 19, (batch, height, width), generator=generator)
    labels[:, : height // 8] = 255  # an ignored band, as real labels have
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, labels.to(device)


def measure_train(spec: Spec, plan, device: torch.device, config: StepConfig, batch: int, size: tuple[int, int],
                  warmup: int, repeats: int, steps: int) -> Timing:
    from harness.losses import SegmentationLoss
    from harness.train import ExpEMA

    width, height = size
    model, forward = build_for_timing(spec, device, config)
    model.train()
    criterion = SegmentationLoss(plan.loss_spec(), group_images=plan.loss_group_images)
    optimizer = torch.optim.SGD(model.parameters(), lr=plan.lr, momentum=plan.momentum, weight_decay=plan.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=config.precision == "fp16")
    ema = ExpEMA(model, plan.ema_decay, plan.ema_ramp) if plan.ema else None
    images, labels = random_batch(batch, width, height, device, config.channels_last, torch.Generator().manual_seed(0))
    dtype = config.autocast_dtype
    counter = [0]

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = criterion(forward(images), labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if ema is not None:
            ema.update(model, step=counter[0])
        counter[0] += 1

    reset_peak_memory(device)
    times = time_steps(step, device, warmup, repeats, steps)
    return Timing(batch, statistics.median(times), times, peak_memory_gib(device))


def measure_infer(spec: Spec, device: torch.device, config: StepConfig, batch: int, size: tuple[int, int],
                  warmup: int, repeats: int, steps: int) -> Timing:
    width, height = size
    model, forward = build_for_timing(spec, device, config)
    model.eval()
    images, _ = random_batch(batch, width, height, device, config.channels_last, torch.Generator().manual_seed(0))
    dtype = config.autocast_dtype

    @torch.inference_mode()
    def step() -> None:
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            forward(images)

    reset_peak_memory(device)
    times = time_steps(step, device, warmup, repeats, steps)
    return Timing(batch, statistics.median(times), times, peak_memory_gib(device))


CACHED_FRAMES = 4  # distinct frames put in the decoded cache that data mode reads back, cycled


@contextmanager
def timing_frames(split: str, size: tuple[int, int], needed: int,
                  data_root: Optional[str]) -> Iterator[tuple[list, Path, str]]:
    """`needed` labelled samples of `split` and their dataset root: the dataset at `data_root`, else a couple of
    generated frames of `size` (decoding costs the same whichever frame it is), cycled."""
    from harness.data.cityscapes import find_samples
    from harness.data.synthetic import write_synthetic

    with tempfile.TemporaryDirectory(prefix="segbench-speed-") as tmp:
        if data_root:
            root = Path(data_root).expanduser()
            samples = find_samples(root, split)
            source = f"{data_root} ({split} split)"
        else:
            root, count = Path(tmp), min(GENERATED_IMAGES, needed)
            write_synthetic(root, train_images=count if split == "train" else 0,
                            val_images=count if split == "val" else 0, size=size, progress=False)
            samples = find_samples(root, split)
            source = f"{len(samples)} generated {size[0]}x{size[1]} PNG frames, cycled"
        yield (samples * math.ceil(needed / len(samples)))[:needed], root, source


def time_loader(dataset, batch: int, workers: int, device: torch.device, warmup: int, repeats: int,
                steps: int) -> tuple[list[float], Any]:
    """Seconds per batch of the training loader over `dataset` (keys 0, 1, ... as (index, seed)), and one more
    batch for the device-side timing."""
    from harness.data.loaders import train_loader

    keys = [(index, index) for index in range(len(dataset))]  # (index, augmentation seed), as the training sampler
    batches = iter(train_loader(dataset, keys, batch, workers, device, seed=0))
    fetch = batches.__next__
    times = time_steps(fetch, torch.device("cpu"), warmup, repeats, steps)
    last = fetch()
    del fetch, batches  # stops the workers before their files are removed
    return times, last


def measure_data(plan, device: torch.device, batch: int, size: tuple[int, int], data_root: Optional[str],
                 workers: int, warmup: int, repeats: int, steps: int) -> tuple[dict[str, Timing], dict[str, Any]]:
    """The training input on whole frames (the dataset at `data_root`, else generated frames of `size`): the loader's
    workers decoding PNGs and drawing augmentations ("data"), the same loader reading decoded frames back from a
    decoded cache ("data cached": a few frames cycled, so from the page cache, as a cache the machine's memory holds
    after its first epoch), and the device turning a batch into the training crops ("augment").
    Returns the timings by name and what was timed."""
    from harness.data.augment import TrainTransform
    from harness.data.cityscapes import CityscapesTrain
    from harness.data.decoded import DecodedFrames, build_cache
    from harness.data.loaders import PREFETCH_BATCHES

    # The workers fill a queue of workers x prefetch batches while the first one is awaited; until it drains,
    # batches come at no cost. Warm up past it and time at least one batch per worker per repeat.
    warmup, steps = max(warmup, workers * PREFETCH_BATCHES) + 1, max(steps, workers)
    needed = batch * (warmup + repeats * steps + 1)  # and one batch for the device-side augmentation
    with timing_frames("train", size, needed, data_root) as (samples, root, source):
        crop = [min(plan.crop_size[0], size[0]), min(plan.crop_size[1], size[1])] if not data_root else plan.crop_size
        times, raw = time_loader(CityscapesTrain(samples, crop, plan.scale_range, plan.flip), batch, workers, device,
                                 warmup, repeats, steps)
        distinct = list({s.image: s for s in samples}.values())[:CACHED_FRAMES]
        with tempfile.TemporaryDirectory(prefix="segbench-decoded-") as cache_dir:
            frames = build_cache(Path(cache_dir), root, "train", distinct, workers=1)
            cycled = DecodedFrames(frames.frames_path, [frames.entries[i % len(distinct)] for i in range(needed)])
            cached_times, _ = time_loader(CityscapesTrain(samples, crop, plan.scale_range, plan.flip, decoded=cycled),
                                          batch, workers, device, warmup, repeats, steps)
    transform = TrainTransform(tuple(crop), plan.pad_value, tuple(plan.mean), tuple(plan.std))
    reset_peak_memory(device)
    augment_times = time_steps(lambda: transform(raw, device), device, max(1, warmup // 4), repeats, steps)
    timings = {
        "data": Timing(batch, statistics.median(times), times, None),
        "data cached": Timing(batch, statistics.median(cached_times), cached_times, None),
        "augment": Timing(batch, statistics.median(augment_times), augment_times,
                          peak_memory_gib(device) if device.type == "cuda" else None),
    }
    return timings, {"images": source, "warmup": warmup, "steps": steps, "crop": list(crop)}


def measure_eval(spec: Spec, plan, device: torch.device, config: StepConfig, size: tuple[int, int],
                 data_root: Optional[str], workers: int, warmup: int, repeats: int,
                 steps: int) -> tuple[Timing, dict[str, Any]]:
    """The evaluation loop itself (harness.evaluate.evaluate: decoding workers, the device-side resize and
    normalisation, the row's test mode, scoring on the device) over whole frames of `size` evaluated at `size`,
    one image at a time; the time between consecutive scored images, after a warm-up past the loader's queue."""
    from harness.data.augment import EvalTransform
    from harness.data.loaders import eval_loader
    from harness.evaluate import TestMode, evaluate

    warmup = max(warmup, workers * 4) + 1  # eval_loader queues 4 images per worker
    needed = warmup + repeats * steps
    model, forward = build_for_timing(spec, device, config)
    mode = TestMode.from_spec(spec, list(size))
    stamps: list[float] = []
    with timing_frames("val", size, needed, data_root) as (samples, _, source):
        transform = EvalTransform(tuple(size), tuple(plan.mean), tuple(plan.std))
        reset_peak_memory(device)
        # Each image's scoring waits for its prediction (the confusion count), so a stamp marks finished work.
        evaluate({"model": forward}, eval_loader(samples, device, workers), device, transform, mode=mode,
                 precision=config.precision, sinks=[lambda scored: stamps.append(time.perf_counter())],
                 progress=False)
    intervals = [b - a for a, b in zip(stamps[warmup - 1 :], stamps[warmup:])]
    times = [sum(intervals[r * steps : (r + 1) * steps]) / steps for r in range(repeats)]
    del model
    return (Timing(1, statistics.median(times), times, peak_memory_gib(device)),
            {"images": source, "warmup": warmup, "steps": steps, "test_mode": mode.describe()})


# --- the command -------------------------------------------------------------------------------------------------


def parse_size(text: Optional[str]) -> Optional[tuple[int, int]]:
    """'W,H' (or WxH) -> (width, height)."""
    if text is None:
        return None
    parts = re.split(r"[,x]", text.strip())
    if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise BenchError(f"--size {text}: give WIDTH,HEIGHT, two positive integers, e.g. --size 256,128")
    return int(parts[0]), int(parts[1])


def defaults(device: torch.device) -> dict[str, int]:
    """Warm-up, repeats and timed steps: timm's benchmark counts on a GPU, a handful on the CPU."""
    return {"warmup": 10, "repeats": 5, "steps": 10} if device.type == "cuda" else {"warmup": 1, "repeats": 3, "steps": 1}


def resolve_sizes(spec: Spec, plan, device: torch.device, size: Optional[tuple[int, int]]) -> dict[str, tuple[int, int]]:
    """[width, height] per mode. Default: the recipe's crop, the row's test size and full frames on a GPU; on the
    CPU the spec's synthetic crop and test size (full frames would take minutes per step) and full frames."""
    if size is not None:
        return {"train": size, "infer": size, "eval": size, "data": size}
    if device.type == "cuda":
        return {"train": tuple(plan.crop_size), "infer": tuple(plan.test_size), "eval": tuple(plan.test_size),
                "data": FULL_SIZE}
    return {"train": tuple(spec.synthetic.crop_size), "infer": tuple(spec.synthetic.test_size),
            "eval": tuple(spec.synthetic.test_size), "data": FULL_SIZE}


def speed(options: SpeedOptions) -> dict[str, Any]:
    """Measure the requested modes, write the record under results/speed/<device>/, return it."""
    from harness.distributed import World
    from harness.models import check_implemented
    from harness.paths import results_dir
    from harness.results import git_commit, package_versions, utc_now, write_record
    from harness.runner import RunOptions, make_plan, pick_device, resolve_precision
    from harness.spec import load_spec

    if options.mode not in (*MODES, "all"):
        raise BenchError(f"--mode {options.mode}: use one of {', '.join(MODES)}, all")
    for name in ("batch", "warmup", "repeats", "steps", "workers"):
        value = getattr(options, name)
        least = 0 if name in ("warmup", "workers") else 1
        if value is not None and value < least:
            raise BenchError(f"--{name} must be at least {least}, got {value}")
    if options.size is not None and (len(options.size) != 2 or min(options.size) < 1):
        raise BenchError(f"--size {options.size}: give WIDTH,HEIGHT, two positive integers")
    spec = load_spec(options.row)
    modes = MODES if options.mode == "all" else (options.mode,)
    if {"train", "infer"} & set(modes):
        check_implemented(spec)
    world = World()
    device = pick_device(options.device, world)
    precision = resolve_precision(options.precision, device)
    plan = make_plan(spec, "cityscapes", CITYSCAPES_TRAIN_IMAGES, RunOptions(row=options.row), precision, world)
    counts = {**defaults(device), **{k: getattr(options, k) for k in ("warmup", "repeats", "steps")
                                     if getattr(options, k) is not None}}
    sizes = resolve_sizes(spec, plan, device, options.size)
    project = StepConfig(precision, channels_last=device.type == "cuda", compile=options.compile)
    plain = StepConfig("fp32", channels_last=False, compile=False)
    peak, peak_dtype = matmul_peak_tflops(device) if {"train", "infer"} & set(modes) else (None, None)

    results = {}
    for mode in modes:
        batch = options.batch or (1 if mode in ("infer", "eval") else plan.batch_size)
        size = sizes[mode]
        entry: dict[str, Any] = {"size": list(size)}
        workers = plan.workers if options.workers is None else options.workers
        if mode == "data":
            timings, timed = measure_data(plan, device, batch, size, options.data_root, workers, **counts)
            for name in ("data", "data cached"):
                per_worker = timings[name].images_per_s / workers if workers else None
                results[name] = {**entry, "workers": workers, **timed, "images_per_s_per_worker": per_worker,
                                 **timing_fields(timings[name])}
            results["augment"] = {"size": timed["crop"], "source_size": list(size), **timing_fields(timings["augment"])}
            continue
        if mode == "eval":
            timing, timed = measure_eval(spec, plan, device, project, size, options.data_root, workers, **counts)
            forward = results.get("infer")
            comparable = forward is not None and forward["size"] == list(size) and forward["batch"] == 1
            entry.update(timing_fields(timing), workers=workers, **timed,
                         fraction_of_forward=timing.images_per_s / forward["images_per_s"] if comparable else None)
            results[mode] = entry
            continue
        flops = training_flops(spec, *size) if mode == "train" else inference_flops(spec, *size)

        def run(config: StepConfig) -> Timing:
            def measure(b: int) -> Timing:
                if mode == "train":
                    return measure_train(spec, plan, device, config, b, size, **counts)
                return measure_infer(spec, device, config, b, size, **counts)
            return with_batch_retry(measure, batch, device)

        previous = torch.backends.cudnn.benchmark
        try:
            torch.backends.cudnn.benchmark = device.type == "cuda"  # as the training loop runs
            timing = run(project)
            torch.backends.cudnn.benchmark = previous  # torchvision references' default
            baseline = run(plain) if options.plain else None
        finally:
            torch.backends.cudnn.benchmark = previous
        achieved = flops * timing.images_per_s / 1e12
        entry.update(timing_fields(timing), flops_per_image=flops, achieved_tflops=achieved,
                     mfu=achieved / peak if peak else None,
                     plain_fp32_nchw=timing_fields(baseline) if baseline else None,
                     speedup_over_plain=timing.images_per_s / baseline.images_per_s if baseline else None)
        results[mode] = entry

    record = {  # write_record files a record under <dataset>/<row>/: here results/speed/<device>/<row>/
        "kind": "speed", "row": spec.row, "dataset": device_name(device), "device": device_name(device),
        "device_type": device.type, "precision": precision, "compile": options.compile,
        "channels_last": project.channels_last, "cpu_threads": torch.get_num_threads(),
        "matmul_peak_tflops": peak, "matmul_peak_dtype": peak_dtype, **counts, "modes": results,
        "git_commit": git_commit(), "versions": package_versions(), "time": utc_now(),
    }
    record["_path"] = str(write_record(record, root=results_dir() / "speed"))
    return record


def timing_fields(timing: Timing) -> dict[str, Any]:
    return {"batch": timing.batch, "images_per_s": timing.images_per_s, "step_s": timing.step_s,
            "step_s_repeats": timing.steps_s, "peak_memory_gib": timing.peak_memory_gib}


COLUMNS = ["row", "mode", "device", "precision", "batch", "size", "img/s", "step ms", "peak mem GiB", "GFLOPs/img",
           "TFLOP/s", "MFU %", "plain fp32 NCHW img/s", "x plain", "notes"]


def mode_notes(mode: str, entry: dict[str, Any], device_type: str) -> str:
    """What a mode's figures mean beyond the columns: per worker, the share of the forward rate, where it ran."""
    if mode in ("data", "data cached"):
        per_worker = entry.get("images_per_s_per_worker")
        what = "decoding PNGs" if mode == "data" else "reading decoded frames (--decoded-cache)"
        return (f"{per_worker:.1f} img/s per worker" if per_worker else "in the main process") + f", {what}"
    if mode == "augment":
        return f"on {device_type}, from {'x'.join(map(str, entry['source_size']))} frames"
    if mode == "eval":
        share = entry.get("fraction_of_forward")
        return (f"{100 * share:.0f}% of infer" if share is not None else "infer not timed alike") + f", {entry['workers']} workers"
    return "-"


def table_rows(record: dict[str, Any]) -> list[list[str]]:
    def fmt(value: Optional[float], spec: str) -> str:
        return "-" if value is None else format(value, spec)

    rows = []
    for mode, entry in record["modes"].items():
        plain = entry.get("plain_fp32_nchw") or {}
        rows.append([
            record["row"], mode + (f" ({entry['workers']} workers)" if mode.startswith("data") else ""), record["device"],
            record["precision"] if mode not in ("data", "data cached", "augment") else "-", str(entry["batch"]),
            "x".join(map(str, entry["size"])),
            fmt(entry["images_per_s"], ".2f"), fmt(1000 * entry["step_s"], ".1f"), fmt(entry["peak_memory_gib"], ".2f"),
            fmt(entry["flops_per_image"] / 1e9 if "flops_per_image" in entry else None, ".1f"),
            fmt(entry.get("achieved_tflops"), ".3f"),
            fmt(100 * entry["mfu"] if entry.get("mfu") is not None else None, ".1f"),
            fmt(plain.get("images_per_s"), ".2f"), fmt(entry.get("speedup_over_plain"), ".2f"),
            mode_notes(mode, entry, record["device_type"]),
        ])
    return rows


def render(record: dict[str, Any]) -> str:
    from tabulate import tabulate

    peak = record["matmul_peak_tflops"]
    lines = [tabulate(table_rows(record), headers=COLUMNS, disable_numparse=True)]
    if peak:
        lines.append(f"MFU against a measured {record['matmul_peak_dtype']} matmul peak of {peak:.2f} TFLOP/s on "
                     f"{record['device']}; peak memory is {'CUDA max allocated' if record['device_type'] == 'cuda' else 'the process peak RSS'}")
    lines.append(f"record {record['_path']}")
    return "\n".join(lines)
