"""The GPU-shaped CPU lane: the code paths a GPU run takes (bf16 autocast, channels_last, the fused SGD kernel,
SyncBatchNorm's conversion, DDP over SFNet's grouped head norms) run here on the CPU, so that a GPU job is not their
first run. What PyTorch cannot run on a CPU is asserted as such (SyncBatchNorm's training forward), so the day it
can, this lane says so. tests/test_cuda_branches.py keeps every other CUDA-only branch accounted for."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from harness.config.plan import make_plan
from harness.config.precision import Compute, resolve_compute
from harness.config.spec import load_spec
from harness.data.augment import collate_raw
from harness.data.cityscapes import CityscapesTrain, find_samples
from harness.data.loaders import eval_loader
from harness.engine.benchmark import SpeedOptions
from harness.engine.distributed import World, _loopback_interface
from harness.engine.train import Trainer, convert_norm
from harness.launch.run import RunOptions, run
from harness.launch.speed import speed
from harness.models import build_model
from harness.models.common import GroupedBatchNorm2d
from tests.helpers import experiments_with, two_gloo_processes
from tests.test_training_resilience import TINY

pytestmark = pytest.mark.slow

CPU = torch.device("cpu")
GPU_SHAPED = Compute("bf16", channels_last=True, fused=True)  # what a CUDA run resolves to by default
# bf16 keeps 8 bits of mantissa: over 6 steps each loss within 2% of fp32's, and the synthetic mIoU after them within
# 1 point (measured on this machine: at most 0.3% and 0.02 points, at an mIoU of 9.6).
LOSS_RTOL, MIOU_POINTS = 0.02, 1.0


def batches(root: Path, plan, count: int) -> list:
    samples = find_samples(root, "train")
    dataset = CityscapesTrain(samples, plan.crop_size, plan.scale_range, plan.flip)
    size = plan.batch_size
    return [collate_raw([dataset[(i * size + j, i * size + j)] for j in range(size)]) for i in range(count)]


def step_losses(trainer: Trainer, raw_batches: list) -> list[float]:
    losses = []
    for raw in raw_batches:
        before = float(trainer._loss_sum)
        trainer.train_step(*trainer.transform(raw, CPU))
        losses.append(float(trainer._loss_sum) - before)
    return losses


def test_the_gpu_shaped_step_and_evaluation_loop_run_on_cpu_in_bf16_channels_last_with_fused_sgd(
        synthetic_root: Path, one_thread):
    assert resolve_compute("cuda") == GPU_SHAPED and resolve_compute("cpu") == Compute("fp32", False, False)
    spec = load_spec("df_seg_v1")
    plan = replace(make_plan(spec, "synthetic", 24, precision="bf16"), batch_size=2)
    torch.manual_seed(0)
    trainer = Trainer(plan, build_model(spec), CPU, World(), progress=False, compute=GPU_SHAPED)
    trainer.set_train_mode()
    assert all(group["fused"] for group in trainer.optimizer.param_groups)
    convs = [m for m in trainer.model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1)]
    assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    images, labels = trainer.transform(batches(synthetic_root, plan, 1)[0], CPU)
    assert images.is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous()
    dtypes: list[torch.dtype] = []
    hook = convs[0].register_forward_hook(lambda m, args, out: dtypes.append(out.dtype))
    weights = convs[-1].weight.detach().clone()
    trainer.train_step(images, labels)
    assert dtypes == [torch.bfloat16] and torch.isfinite(trainer._loss_sum)
    assert not torch.equal(weights, convs[-1].weight)  # the fused kernel stepped
    # The evaluation loop: the input in channels_last, the forward in bf16, scored into a confusion matrix.
    dtypes.clear()
    metrics = trainer.evaluate(eval_loader(find_samples(synthetic_root, "val")[:2], CPU))
    hook.remove()
    assert set(dtypes) == {torch.bfloat16} and len(dtypes) >= 2 and 0 <= metrics["raw"].miou <= 100


def test_bf16_training_stays_within_tolerance_of_fp32(synthetic_root: Path, one_thread):
    spec = load_spec("df_seg_v1")
    # No warm-up: the full learning rate from the first step, so that 6 steps reach an mIoU to compare.
    plan = replace(make_plan(spec, "synthetic", 24), batch_size=4, warmup_iters=0)
    raw = batches(synthetic_root, plan, 6)
    val = find_samples(synthetic_root, "val")[:4]
    losses, miou = {}, {}
    for precision, compute in (("fp32", resolve_compute("cpu")), ("bf16", GPU_SHAPED)):
        torch.manual_seed(0)
        trainer = Trainer(replace(plan, precision=precision), build_model(spec), CPU, World(), progress=False,
                          compute=compute)
        trainer.set_train_mode()
        losses[precision] = step_losses(trainer, raw)
        miou[precision] = trainer.evaluate(eval_loader(val, CPU))["raw"].miou
    assert losses["bf16"] != losses["fp32"]  # autocast really ran
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=LOSS_RTOL)
    assert miou["fp32"] > 3 and abs(miou["bf16"] - miou["fp32"]) <= MIOU_POINTS, miou  # percentages


def test_a_short_gpu_shaped_deterministic_bench_run_completes_on_cpu(tmp_path, monkeypatch, synthetic_root: Path,
                                                                     one_thread):
    monkeypatch.setenv("SEGBENCH_EXPERIMENTS", str(experiments_with(tmp_path, {"tiny": TINY})))
    record = run(RunOptions(row="tiny", synthetic=True, iters=4, device="cpu", progress=False, offline_tracking=True,
                            precision="bf16", channels_last=True, fused=True, deterministic=True))
    assert record.precision == "bf16" and record.iterations == 4 and 0 <= record.miou <= 100


def test_bench_speed_times_the_gpu_shaped_step_and_evaluation_loop_on_cpu(one_thread):
    record = speed(SpeedOptions(row="df_seg_v1", mode="train", device="cpu", batch=2, size=(64, 32), warmup=0,
                                repeats=1, steps=1, precision="bf16", channels_last=True, fused=True, plain=False))
    evaluation = speed(SpeedOptions(row="df_seg_v1", mode="eval", device="cpu", size=(64, 32), warmup=0, repeats=1,
                                    steps=1, workers=0, precision="bf16", channels_last=True, fused=True))
    for measured in (record, evaluation):
        assert (measured.precision, measured.channels_last, measured.fused) == ("bf16", True, True)
    assert record.modes["train"]["images_per_s"] > 0 and evaluation.modes["eval"]["images_per_s"] > 0


# --- two gloo processes through the GPU path's norms ---------------------------------------------------------

IMAGES, SIZE = 8, 64


def _gloo_process(rank: int, size: int, store: str, out: str) -> None:
    loopback = _loopback_interface()
    if loopback:
        os.environ["GLOO_SOCKET_IFNAME"] = loopback
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store, size), rank=rank, world_size=size)
    try:
        world = World(rank, size, rank, size)
        spec = load_spec("sf_seg_v1")
        plan = make_plan(spec, "synthetic", 24, world_size=size, precision="bf16")
        generator = torch.Generator().manual_seed(1)
        images = torch.randn(IMAGES, 3, SIZE, SIZE, generator=generator)[rank::size]
        labels = torch.randint(0, 19, (IMAGES, SIZE, SIZE), generator=generator)[rank::size]
        torch.manual_seed(0)
        # The conversion a CUDA run makes: the encoder's norms to SyncBatchNorm, SFNet's head norms kept grouped.
        converted = convert_norm(build_model(spec), world, "cuda")
        kinds = {"sync": sum(isinstance(m, nn.SyncBatchNorm) for m in converted.modules()),
                 "grouped": sum(isinstance(m, GroupedBatchNorm2d) for m in converted.modules()),
                 "plain": sum(type(m) is nn.BatchNorm2d for m in converted.modules())}
        converted = converted.to(memory_format=torch.channels_last)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            evaluated = converted.eval()(images.contiguous(memory_format=torch.channels_last))
        try:  # what PyTorch runs on CUDA only: SyncBatchNorm's statistics exchange in training
            converted.train()(images)
            refused = ""
        except ValueError as exc:
            refused = str(exc)
        # The rest of the CUDA path: DDP over gloo, bf16, channels_last, fused SGD, the grouped head norms.
        torch.manual_seed(0)
        trainer = Trainer(plan, build_model(spec), CPU, world, progress=False, compute=GPU_SHAPED)
        trainer.set_train_mode()
        trainer.train_step(images.contiguous(memory_format=torch.channels_last), labels)
        grouped = [t.clone() for m in trainer.model.modules() if isinstance(m, GroupedBatchNorm2d)
                   for t in (m.running_mean, m.running_var)]
        head = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        torch.save({"kinds": kinds, "eval_dtype": evaluated.dtype if isinstance(evaluated, torch.Tensor) else None,
                    "refused": refused, "loss": float(trainer._loss_sum), "grouped": grouped, "params": head},
                   Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_convert_to_syncbn_keep_sfnets_grouped_head_norms_and_train_in_bf16(tmp_path, one_thread):
    ranks = two_gloo_processes(_gloo_process, tmp_path)
    for result in ranks:
        # SFNet v1's 10 head norms (UP's per-GPU GroupedBatchNorm2d) stay per process; every other norm syncs.
        assert result["kinds"]["grouped"] == 10 and result["kinds"]["sync"] > 10 and result["kinds"]["plain"] == 0
        assert "SyncBatchNorm expected input tensor to be on GPU" in result["refused"]
        assert torch.isfinite(torch.tensor(result["loss"]))
    # DDP averaged the gradients: both ranks hold the same weights; the grouped statistics are rank 0's on both.
    for name, value in ranks[0]["params"].items():
        assert torch.equal(value, ranks[1]["params"][name]), name
    for mine, theirs in zip(ranks[0]["grouped"], ranks[1]["grouped"]):
        assert torch.equal(mine, theirs)
