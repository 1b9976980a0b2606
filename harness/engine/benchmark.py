"""The measurements of `bench speed` (harness.launch.speed writes their record): how fast a row trains, infers
and loads data on this machine, measured rather than guessed.

Each mode times one unit of work after a warm-up, synchronised with the device (CUDA events on a GPU,
perf_counter on the CPU), and reports the median over repeated runs:

- train: one step of the training loop itself (`Trainer.train_step`, the step `bench run` trains with: the row's
  loss, the optimizer `make_optimizer` builds, the GradScaler for fp16, the EMA update of EMA rows), on random
  images at the crop size;
- infer: one whole-image eval-mode forward at the row's test size;
- eval: the evaluation loop itself (decoding workers, device-side resize and normalisation, the row's test mode,
  scoring on the device), one image at a time at the test size, and its share of the infer rate;
- data: one batch from the training loader (workers decoding frames, CityscapesTrain) on full-size images,
  generated at 2048x1024 when no dataset is given; as "data cached", the same loader reading decoded frames back
  from a decoded cache (harness.data.decoded); and, as "augment", the device turning such a batch into the
  training crops (harness.data.augment.TrainTransform).

Train and infer also run the same step as a plain fp32 NCHW eager loop (the torchvision-references way: the
trainer's `plain` mode, unfused SGD) in the same process and report the ratio. FLOPs come from
torch.utils.flop_counter (as `bench list --sizes`), and the
model-FLOP utilisation is taken against a matrix-multiply peak measured here (bf16 on a GPU, fp32 on the CPU).
A batch that does not fit is retried smaller, as timm's benchmark.py does.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from harness.config.benchmark import FRAME_SIZE
from harness.config.plan import TrainPlan, scaled_test_crop, size_pair
from harness.config.precision import PLAIN, Compute
from harness.config.spec import Spec
from harness.engine.device import (
    peak_memory_gib,
    reset_peak_memory,
    time_steps,
)
from harness.engine.distributed import World
from harness.engine.train import Trainer
from harness.errors import BenchError
from harness.models import build_model
from harness.models.sizes import inference_flops, training_flops

MODES = ("train", "infer", "eval", "data")
FULL_SIZE = FRAME_SIZE
GENERATED_IMAGES = 2  # distinct generated frames, cycled; decoding cost does not depend on which one


@dataclass
class SpeedOptions:
    row: str
    mode: str = "all"
    batch: Optional[int] = None  # default: the row's global batch (train, data), 1 (infer, as evaluation runs)
    precision: Optional[str] = None
    channels_last: Optional[bool] = None  # default: the device's (harness.config.precision.Compute)
    fused: Optional[bool] = None
    compile: bool = False
    device: Optional[str] = None
    size: Optional[tuple[int, int]] = None  # [width, height] for every mode; default: the row's sizes
    data_root: Optional[str] = None
    workers: Optional[int] = None  # default: the spec's train.workers
    warmup: Optional[int] = None
    repeats: Optional[int] = None
    steps: Optional[int] = None  # timed units per repeat
    plain: bool = True  # also time the plain fp32 NCHW eager loop
    onnx: Optional[str] = None  # an exported ONNX file: onnxruntime's inference beside PyTorch's, at its size
    keep_record: bool = False  # a CPU's record under results/speed (committed, read by benchmark.md) too


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


# --- the three modes ---------------------------------------------------------------------------------------------


@dataclass
class StepConfig:
    """How a step runs: the project's way (the run's Compute: precision, memory format, optimizer kernel; optional
    compile) or the plain fp32 NCHW eager way (PLAIN)."""

    compute: Compute
    compile: bool = False


def build_for_timing(spec: Spec, device: torch.device, config: StepConfig) -> tuple[nn.Module, nn.Module]:
    """(the module, the callable that runs it): random weights, the timing does not depend on them."""
    model = build_model(spec).to(device)
    if config.compute.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, (torch.compile(model) if config.compile else model)  # type: ignore[return-value]


def random_batch(batch: int, width: int, height: int, device: torch.device, channels_last: bool,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.randn(batch, 3, height, width, generator=generator).to(device)
    labels = torch.randint(0, 19, (batch, height, width), generator=generator)
    labels[:, : height // 8] = 255  # an ignored band, as real labels have
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, labels.to(device)


def measure_train(spec: Spec, plan: TrainPlan, device: torch.device, config: StepConfig, batch: int,
                  size: tuple[int, int], warmup: int, repeats: int, steps: int) -> Timing:
    """`Trainer.train_step`, the step `bench run` trains with, on one batch of random images at `size`."""
    width, height = size
    plan = dataclasses.replace(plan, precision=config.compute.precision)
    trainer = Trainer(plan, build_model(spec), device, World(), progress=False, compile_model=config.compile,
                      compute=config.compute)
    trainer.set_train_mode()
    images, labels = random_batch(batch, width, height, device, trainer.channels_last,
                                  torch.Generator().manual_seed(0))
    reset_peak_memory(device)
    times = time_steps(lambda: trainer.train_step(images, labels), device, warmup, repeats, steps)
    return Timing(batch, statistics.median(times), times, peak_memory_gib(device))


def measure_infer(spec: Spec, device: torch.device, config: StepConfig, batch: int, size: tuple[int, int],
                  warmup: int, repeats: int, steps: int) -> Timing:
    width, height = size
    model, forward = build_for_timing(spec, device, config)
    model.eval()
    images, _ = random_batch(batch, width, height, device, config.compute.channels_last,
                             torch.Generator().manual_seed(0))
    dtype = config.compute.autocast

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
    from harness.data.synthetic import PHOTO_LIKE, write_synthetic

    with tempfile.TemporaryDirectory(prefix="segbench-speed-") as tmp:
        if data_root:
            root = Path(data_root).expanduser()
            samples = find_samples(root, split)
            source = f"{data_root} ({split} split)"
        else:
            root, count = Path(tmp), min(GENERATED_IMAGES, needed)
            write_synthetic(root, train_images=count if split == "train" else 0,
                            val_images=count if split == "val" else 0, size=size, progress=False, **PHOTO_LIKE)
            samples = find_samples(root, split)
            megabytes = sum(s.image.stat().st_size for s in samples) / len(samples) / 1e6
            source = (f"{len(samples)} generated {size[0]}x{size[1]} PNG frames of {megabytes:.1f} MB "
                      "(compressing as Cityscapes photos), cycled")
        yield (samples * math.ceil(needed / len(samples)))[:needed], root, source


def time_loader(dataset, batch: int, workers: int, device: torch.device, warmup: int, repeats: int,
                steps: int) -> tuple[list[float], Any]:
    """Seconds per batch of the training loader over `dataset` (keys 0, 1, ... as (index, seed)), and one more
    batch for the device-side timing."""
    from harness.data.loaders import batches, train_loader

    keys = [(index, index) for index in range(len(dataset))]  # (index, augmentation seed), as the training sampler
    loaded = batches(train_loader(dataset, keys, batch, workers, device, seed=0))  # type: ignore[arg-type]
    fetch = loaded.__next__
    times = time_steps(fetch, torch.device("cpu"), warmup, repeats, steps)
    last = fetch()
    loaded.close()  # stops the workers before their files are removed
    del fetch, loaded
    return times, last


DECODE_REPEATS = 9  # decodes of one sample per decoder for its floor (median)


def measure_decode_floors(sample, repeats: int = DECODE_REPEATS) -> dict[str, float]:
    """Samples per second that each installed PNG decoder turns out on one core (image and label, from bytes in
    memory as a worker's reads come from the page cache): the most a loader worker can deliver with it."""
    from harness.data.png import decode_png, installed_decoders

    files = [sample.image.read_bytes()] + ([sample.label.read_bytes()] if sample.label is not None else [])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # torchvision's decoder; the others decode on one thread anyway
    try:
        floors = {}
        for name in installed_decoders():
            for data in files:  # warm: the library's import and first allocation
                decode_png(data, name)
            times = []
            for _ in range(repeats):
                began = time.perf_counter()
                for data in files:
                    decode_png(data, name)
                times.append(time.perf_counter() - began)
            floors[name] = 1 / statistics.median(times)
        return floors
    finally:
        torch.set_num_threads(threads)


def measure_data(plan, device: torch.device, batch: int, size: tuple[int, int], data_root: Optional[str],
                 workers: int, warmup: int, repeats: int, steps: int) -> tuple[dict[str, Timing], dict[str, Any]]:
    """The training input on whole frames (the dataset at `data_root`, else generated frames of `size`): the loader's
    workers decoding PNGs with the fastest decoder installed and drawing augmentations ("data"), the same with
    Pillow ("data pillow", where another decoder is the loader's), each installed decoder's single-core rate (the
    floor a worker approaches; the faster of two measurements, before and after the loader's), the same loader
    reading decoded frames back from a decoded cache ("data cached": a few frames cycled, so from the page cache, as
    a cache the machine's memory holds after its first epoch), and the device turning a batch into the training
    crops ("augment").
    Returns the timings by name and what was timed."""
    from harness.data.augment import TrainTransform
    from harness.data.cityscapes import CityscapesTrain
    from harness.data.decoded import DecodedFrames, build_cache
    from harness.data.loaders import PREFETCH_BATCHES, batches_to_steady_rate
    from harness.data.png import loader_decoder, using_decoder

    # Warm up to the loader's steady rate and time at least one batch per worker per repeat.
    warmup, steps = max(warmup, batches_to_steady_rate(workers, PREFETCH_BATCHES)) + 1, max(steps, workers)
    needed = batch * (warmup + repeats * steps + 1)  # and one batch for the device-side augmentation
    with timing_frames("train", size, needed, data_root) as (samples, root, source):
        crop = [min(plan.crop_size[0], size[0]), min(plan.crop_size[1], size[1])] if not data_root else plan.crop_size
        floors_before = measure_decode_floors(samples[0])
        times, raw = time_loader(CityscapesTrain(samples, crop, plan.scale_range, plan.flip), batch, workers, device,
                                 warmup, repeats, steps)
        decoder, pillow_times = loader_decoder(), None
        if decoder != "pillow":
            with using_decoder("pillow"):
                pillow_times, _ = time_loader(CityscapesTrain(samples, crop, plan.scale_range, plan.flip), batch,
                                              workers, device, warmup, repeats, steps)
        # A floor is what a core can do: of two measurements around the loader's timings, the faster (a moment of
        # a busy host only slows one down, and a floor measured then would flatter the loader's share of it).
        floors = {name: max(rate, floors_before[name]) for name, rate in measure_decode_floors(samples[0]).items()}
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
        **({"data pillow": Timing(batch, statistics.median(pillow_times), pillow_times, None)}
           if pillow_times is not None else {}),
        "data cached": Timing(batch, statistics.median(cached_times), cached_times, None),
        "augment": Timing(batch, statistics.median(augment_times), augment_times,
                          peak_memory_gib(device) if device.type == "cuda" else None),
    }
    return timings, {"images": source, "warmup": warmup, "steps": steps, "crop": list(crop), "decoder": decoder,
                     "decode_floors": floors}


def measure_eval(spec: Spec, plan: TrainPlan, device: torch.device, config: StepConfig, size: tuple[int, int],
                 data_root: Optional[str], workers: int, warmup: int, repeats: int,
                 steps: int) -> tuple[Timing, dict[str, Any]]:
    """The evaluation loop itself (harness.engine.evaluate.evaluate: decoding workers, the device-side resize and
    normalisation, the row's test mode, scoring on the device) over whole frames of `size` evaluated at `size`,
    one image at a time; the time between consecutive scored images, after a warm-up past the loader's queue."""
    from harness.data.augment import EvalTransform
    from harness.data.loaders import EVAL_PREFETCH, batches_to_steady_rate, eval_loader
    from harness.engine.evaluate import TestMode, evaluate

    warmup = max(warmup, batches_to_steady_rate(workers, EVAL_PREFETCH)) + 1  # past the images eval_loader queues
    needed = warmup + repeats * steps
    model, forward = build_for_timing(spec, device, config)
    crop_test, crop_stride = scaled_test_crop(spec, list(size))
    mode = TestMode.from_plan(dataclasses.replace(plan, test_size=list(size), crop_test=crop_test,
                                                  crop_stride=crop_stride))
    stamps: list[float] = []
    with timing_frames("val", size, needed, data_root) as (samples, _, source):
        transform = EvalTransform(size, tuple(plan.mean), tuple(plan.std), channels_last=config.compute.channels_last)
        reset_peak_memory(device)
        # Each image's scoring waits for its prediction (the confusion count), so a stamp marks finished work.
        evaluate({"model": forward}, eval_loader(samples, device, workers), device, transform, mode=mode,
                 precision=config.compute.precision, sinks=[lambda scored: stamps.append(time.perf_counter())],
                 progress=False)
    intervals = [b - a for a, b in zip(stamps[warmup - 1 :], stamps[warmup:])]
    times = [sum(intervals[r * steps : (r + 1) * steps]) / steps for r in range(repeats)]
    del model
    return (Timing(1, statistics.median(times), times, peak_memory_gib(device)),
            {"images": source, "warmup": warmup, "steps": steps, "test_mode": mode.describe()})


# --- the command -------------------------------------------------------------------------------------------------


def defaults(device: torch.device) -> dict[str, int]:
    """Warm-up, repeats and timed steps: timm's benchmark counts on a GPU, a handful on the CPU."""
    if device.type == "cuda":
        return {"warmup": 10, "repeats": 5, "steps": 10}
    return {"warmup": 1, "repeats": 3, "steps": 1}


def resolve_sizes(spec: Spec, plan: TrainPlan, device: torch.device,
                  size: Optional[tuple[int, int]]) -> dict[str, tuple[int, int]]:
    """[width, height] per mode. Default: the recipe's crop, the row's test size and full frames on a GPU; on the
    CPU the spec's synthetic crop and test size (full frames would take minutes per step) and full frames."""
    if size is not None:
        return {"train": size, "infer": size, "eval": size, "data": size}
    if device.type == "cuda":
        return {"train": size_pair(plan.crop_size), "infer": size_pair(plan.test_size),
                "eval": size_pair(plan.test_size), "data": FULL_SIZE}
    return {"train": size_pair(spec.synthetic.crop_size), "infer": size_pair(spec.synthetic.test_size),
            "eval": size_pair(spec.synthetic.test_size), "data": FULL_SIZE}


def check_speed_options(options: SpeedOptions) -> None:
    if options.mode not in (*MODES, "all"):
        raise BenchError(f"--mode {options.mode}: use one of {', '.join(MODES)}, all")
    for name in ("batch", "warmup", "repeats", "steps", "workers"):
        value = getattr(options, name)
        least = 0 if name in ("warmup", "workers") else 1
        if value is not None and value < least:
            raise BenchError(f"--{name} must be at least {least}, got {value}")
    if options.onnx and options.mode not in ("infer", "all"):
        raise BenchError(f"--onnx times inference: drop --mode {options.mode} (or use --mode infer)")
    if options.size is not None and (len(options.size) != 2 or min(options.size) < 1):
        raise BenchError(f"--size {options.size}: give WIDTH,HEIGHT, two positive integers")


@dataclass
class Bench:
    """What every mode of one row's measurement shares."""

    options: SpeedOptions
    spec: Spec
    plan: TrainPlan
    device: torch.device
    counts: dict[str, int]  # warmup, repeats, steps
    peak: Optional[float]  # measured matmul TFLOP/s
    compute: Compute  # the plan's precision, the memory format and optimizer kernel asked for

    @property
    def workers(self) -> int:
        return self.plan.workers if self.options.workers is None else self.options.workers


def measure_step(bench: Bench, mode: str, batch: int, size: tuple[int, int]) -> dict[str, Any]:
    """train or infer: the project's step and its plain fp32 NCHW twin, FLOPs, MFU and the ratio."""
    spec, device, counts = bench.spec, bench.device, bench.counts
    flops = training_flops(spec, *size) if mode == "train" else inference_flops(spec, *size)

    def run(config: StepConfig) -> Timing:
        def measure(b: int) -> Timing:
            if mode == "train":
                return measure_train(spec, bench.plan, device, config, b, size, **counts)
            return measure_infer(spec, device, config, b, size, **counts)
        return with_batch_retry(measure, batch, device)

    previous = torch.backends.cudnn.benchmark
    try:
        torch.backends.cudnn.benchmark = device.type == "cuda"  # as the training loop runs
        timing = run(StepConfig(bench.compute, compile=bench.options.compile))
        torch.backends.cudnn.benchmark = previous  # torchvision references' default
        baseline = run(StepConfig(PLAIN)) if bench.options.plain else None
    finally:
        torch.backends.cudnn.benchmark = previous
    achieved = flops * timing.images_per_s / 1e12
    return {"size": list(size), **timing_fields(timing), "flops_per_image": flops, "achieved_tflops": achieved,
            "mfu": achieved / bench.peak if bench.peak else None,
            "plain_fp32_nchw": timing_fields(baseline) if baseline else None,
            "speedup_over_plain": timing.images_per_s / baseline.images_per_s if baseline else None}


def measure_modes(bench: Bench, modes: tuple[str, ...], sizes: dict[str, tuple[int, int]]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for mode in modes:
        batch = bench.options.batch or (1 if mode in ("infer", "eval") else bench.plan.batch_size)
        size, workers = sizes[mode], bench.workers
        if mode == "data":
            timings, timed = measure_data(bench.plan, bench.device, batch, size, bench.options.data_root, workers,
                                          **bench.counts)
            floors = timed.pop("decode_floors")
            for name in ("data", "data pillow", "data cached"):
                if name not in timings:
                    continue
                per_worker = timings[name].images_per_s / workers if workers else None
                decoder = {"data": timed["decoder"], "data pillow": "pillow"}.get(name)
                results[name] = {"size": list(size), "workers": workers, **timed, "decoder": decoder,
                                 "images_per_s_per_worker": per_worker, **timing_fields(timings[name])}
                if decoder is not None:  # the single-core decode rate beside the worker's
                    results[name]["decode_floor_images_per_s"] = floors[decoder]
                    results[name]["fraction_of_floor"] = per_worker / floors[decoder] if per_worker else None
            results["data"]["decode_floors"] = floors
            results["augment"] = {"size": timed["crop"], "source_size": list(size),
                                  **timing_fields(timings["augment"])}
        elif mode == "eval":
            project = StepConfig(bench.compute, compile=bench.options.compile)
            timing, timed = measure_eval(bench.spec, bench.plan, bench.device, project, size,
                                         bench.options.data_root, workers, **bench.counts)
            forward = results.get("infer")
            share = (timing.images_per_s / forward["images_per_s"]
                     if forward is not None and forward["size"] == list(size) and forward["batch"] == 1 else None)
            results[mode] = {"size": list(size), **timing_fields(timing), "workers": workers, **timed,
                             "fraction_of_forward": share}
        else:
            results[mode] = measure_step(bench, mode, batch, size)
    return results


def timing_fields(timing: Timing) -> dict[str, Any]:
    return {"batch": timing.batch, "images_per_s": timing.images_per_s, "step_s": timing.step_s,
            "step_s_repeats": timing.steps_s, "peak_memory_gib": timing.peak_memory_gib}
