"""The last two differences from United-Perception, closed: SFNet's head batch norms normalise over groups of UP's
per-GPU batch (2 images), per process on any process count, with UP's rank-0 running statistics; UP's EMA leaves
integer buffers alone."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from harness.config.plan import make_plan
from harness.config.spec import load_spec
from harness.engine.distributed import World, _loopback_interface
from harness.engine.ema import ExpEMA
from harness.engine.train import Trainer, convert_norm
from harness.errors import BenchError
from harness.launch.options import check_batch_norm
from harness.models import build_model
from harness.models.common import GroupedBatchNorm2d, count_parameters
from tests.helpers import two_gloo_processes
from tests.test_models_up_sfnet import UP_PARAMS


def test_groups_are_ups_per_gpu_batches_on_a_hand_built_example():
    """Four one-channel 1x2 images, UP's per-GPU batch of 2: strided groups {0, 2} and {1, 3}, each normalised by
    its own mean and variance, the running statistics from the first group only (UP's rank 0)."""
    norm = GroupedBatchNorm2d(1, eps=1e-5)
    norm.group_images = 2
    x = torch.tensor([0.0, 1.0, 10.0, 11.0, 2.0, 3.0, 20.0, 21.0]).view(4, 1, 1, 2)
    out = norm.train()(x)
    first = (torch.tensor([0.0, 1.0, 2.0, 3.0]) - 1.5) / torch.tensor(1.25 + 1e-5).sqrt()  # mean 1.5, biased var 1.25
    second = (torch.tensor([10.0, 11.0, 20.0, 21.0]) - 15.5) / torch.tensor(25.25 + 1e-5).sqrt()
    assert torch.allclose(out[[0, 2]].flatten(), first) and torch.allclose(out[[1, 3]].flatten(), second)
    # momentum 0.1 from (0, 1): group {0, 2}'s mean 1.5 and unbiased variance 5/3
    assert torch.allclose(norm.running_mean, torch.tensor([0.15]))
    assert torch.allclose(norm.running_var, torch.tensor([0.9 + 0.1 * 5 / 3]))
    assert int(norm.num_batches_tracked) == 1


def test_each_group_is_plain_batch_norm_of_its_images_and_gradients_flow():
    torch.manual_seed(0)
    norm = GroupedBatchNorm2d(3)
    nn.init.uniform_(norm.weight)
    nn.init.uniform_(norm.bias)
    norm.group_images = 2
    x = (torch.randn(8, 3, 4, 5) * torch.arange(1.0, 9.0).view(8, 1, 1, 1)).requires_grad_()
    out = norm.train()(x)
    references = []
    for group in range(4):  # UP's GPU g held images g and g + 4 of this batch
        reference = nn.BatchNorm2d(3)
        reference.load_state_dict({k: v for k, v in norm.state_dict().items() if k != "num_batches_tracked"},
                                  strict=False)
        reference.running_mean.zero_()
        reference.running_var.fill_(1.0)
        assert torch.allclose(out[group::4], reference.train()(x[group::4]), atol=1e-5)
        references.append(reference)
    assert torch.allclose(norm.running_mean, references[0].running_mean)
    assert torch.allclose(norm.running_var, references[0].running_var)
    out.square().sum().backward()
    assert x.grad is not None and norm.weight.grad is not None and torch.isfinite(norm.weight.grad).all()
    assert torch.allclose(norm.eval()(x), nn.functional.batch_norm(x, norm.running_mean, norm.running_var,
                                                                    norm.weight, norm.bias, False, 0.0, norm.eps))


@pytest.mark.parametrize("row, backbone", [("sf_seg_v1", "dfnet1"), ("sf_seg_v2", "dfnet2")])
def test_sfnet_head_norms_are_grouped_and_stay_per_process_with_counts_unchanged(row, backbone):
    model = build_model(load_spec(row))
    grouped = [name for name, m in model.named_modules() if isinstance(m, GroupedBatchNorm2d)]
    assert len(grouped) == 10 and not any(name.startswith("backbone.") for name in grouped)  # UP's AlignHead
    assert count_parameters(model) == UP_PARAMS[backbone]
    # On GPUs the encoder becomes SyncBatchNorm; the head's layers stay per process.
    converted = convert_norm(model, World(0, 2, 0, 2), "cuda")
    kinds = {name: type(m) for name, m in converted.named_modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    assert all(kind is GroupedBatchNorm2d for name, kind in kinds.items() if name in grouped)
    assert all(kind is nn.SyncBatchNorm for name, kind in kinds.items() if name not in grouped)
    assert count_parameters(converted) == UP_PARAMS[backbone]


def test_one_image_per_group_is_refused_even_where_the_encoder_would_be_syncbn():
    """16 GPUs give SFNet one image per process: SyncBatchNorm covers the encoder, but the head normalises per GPU
    group, a single image whose pooled 1x1 bin has one value per channel. 8 GPUs (UP's 2 images each) are fine."""
    spec = load_spec("sf_seg_v1")
    crop = spec.train.crop_size
    with pytest.raises(BenchError, match="1 image per group .* batch norm context.pools.0.2"):
        check_batch_norm(spec, "columns.batch_size", 16, "train.crop_size", crop, 1, 16, "cuda", 2)
    check_batch_norm(spec, "columns.batch_size", 16, "train.crop_size", crop, 2, 8, "cuda", 2)


def test_ema_averages_floating_point_tensors_and_leaves_integer_buffers_alone():
    """UP's ExpEMA: v = decay * v + (1 - decay) * model for floating-point tensors; num_batches_tracked stays."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    ema = ExpEMA(model, decay=0.9, ramp=0)
    for _ in range(3):
        model.train()(torch.randn(2, 3, 4, 4))
    with torch.no_grad():
        model[0].weight.add_(1.0)
    before = {k: v.clone() for k, v in ema.module.state_dict().items()}
    ema.update(model, step=5)
    current = model.state_dict()
    for key, value in ema.module.state_dict().items():
        if value.is_floating_point():
            assert torch.allclose(value, 0.9 * before[key] + 0.1 * current[key]), key
        else:
            assert int(value) == 0 and int(current[key]) == 3, key


# --- one process and two (gloo) ------------------------------------------------------------------------

IMAGES, SIZE = 16, 64  # UP's global batch of SFNet, tiny frames


def one_step(world: World) -> dict[str, dict[str, torch.Tensor] | torch.Tensor]:
    """One `Trainer.train_step` of SFNet v1 on this process's share of a fixed 16-image batch (dealt round-robin, as
    the sampler deals it); the encoder's batch norms in eval mode, so they do not depend on the process count (on
    GPUs they are SyncBatchNorm). Returns the head's logits, its running statistics and its weights after the step."""
    spec = load_spec("sf_seg_v1")
    plan = make_plan(spec, "synthetic", 24, world_size=world.size)
    assert plan.loss_group_images == 2
    torch.manual_seed(0)
    model = build_model(spec)
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(IMAGES, 3, SIZE, SIZE, generator=generator)
    labels = torch.randint(0, 19, (IMAGES, SIZE, SIZE), generator=generator)
    trainer = Trainer(plan, model, torch.device("cpu"), world, progress=False)
    trainer.set_train_mode()
    trainer.model.backbone.eval()
    for module in trainer.model.modules():  # dropout draws differ with the process count (UP's did too)
        if isinstance(module, nn.Dropout2d):
            module.eval()
    seen: list[torch.Tensor] = []
    hook = trainer.model.classifier.register_forward_hook(lambda m, args, out: seen.append(out.detach().clone()))
    trainer.train_step(images[world.rank :: world.size], labels[world.rank :: world.size])
    hook.remove()
    grouped = {name for name, m in trainer.model.named_modules() if isinstance(m, GroupedBatchNorm2d)}
    stats = {name: t.clone() for name, t in trainer.model.named_buffers() if name.rsplit(".", 1)[0] in grouped}
    head = {name: p.detach().clone() for name, p in trainer.model.named_parameters()
            if not name.startswith("backbone.")}
    return {"logits": seen[0], "stats": stats, "head": head}


def _process(rank: int, size: int, store: str, out: str) -> None:
    loopback = _loopback_interface()
    if loopback:
        os.environ["GLOO_SOCKET_IFNAME"] = loopback  # gloo listens on loopback only
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store, size), rank=rank, world_size=size)
    try:
        torch.save(one_step(World(rank, size, rank, size)), Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_one_process_and_two_gloo_processes_give_the_same_head_statistics_and_outputs(tmp_path, one_thread):
    single = one_step(World())
    ranks = two_gloo_processes(_process, tmp_path)
    for rank, result in enumerate(ranks):
        assert torch.allclose(result["logits"], single["logits"][rank::2], atol=1e-5), rank
        assert set(result["stats"]) == set(single["stats"]) and len(single["stats"]) == 30  # 10 x mean, var, count
        for name, value in single["stats"].items():
            assert torch.allclose(result["stats"][name], value, atol=1e-6), (rank, name)
        for name, value in single["head"].items():
            assert torch.allclose(result["head"][name], value, atol=1e-6), (rank, name)
