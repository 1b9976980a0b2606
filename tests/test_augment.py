"""The data pipeline: workers decode and draw, the device augments. The device-side augmentation equals a
straightforward per-sample implementation on the same draws, and a sample's batch is the same for 1 and 2
processes, any worker count and after a resume."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from harness.data.augment import Draw, EvalTransform, TrainTransform, collate_raw, draw_augmentation
from harness.data.cityscapes import IMAGENET_MEAN, IMAGENET_STD, CityscapesTrain, decode_pair, find_samples
from harness.data.labels import LABEL_TO_TRAIN
from harness.data.loaders import endless_batches, train_loader
from harness.engine.distributed import ShardedTrainSampler, World

MEAN, STD = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)


def reference_sample(image: torch.Tensor, label: torch.Tensor, draw: Draw, crop: tuple[int, int],
                     pad_value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The augmentation as the CPU once did it, one sample in float: normalise the whole image, resize, flip, pad
    with the normalised pad colour and the ignore label, crop."""
    crop_w, crop_h = crop
    image = (image.permute(2, 0, 1).float() - MEAN) / STD
    label = label.long()
    image = F.interpolate(image[None], size=(draw.height, draw.width), mode="bilinear", align_corners=False)[0]
    label = F.interpolate(label[None, None].float(), size=(draw.height, draw.width), mode="nearest")[0, 0].long()
    if draw.flip:
        image, label = image.flip(-1), label.flip(-1)
    pad_h, pad_w = max(crop_h - draw.height, 0), max(crop_w - draw.width, 0)
    padded = ((torch.full((3, 1, 1), float(pad_value)) - MEAN) / STD).expand(3, draw.height + pad_h, draw.width + pad_w).clone()
    padded[:, : draw.height, : draw.width] = image
    label = F.pad(label, (0, pad_w, 0, pad_h), value=255)
    window = (slice(draw.top, draw.top + crop_h), slice(draw.left, draw.left + crop_w))
    return padded[(slice(None), *window)], label[window]


@pytest.fixture(scope="module")
def frames(synthetic_root: Path) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [decode_pair(s) for s in find_samples(synthetic_root, "train")[:6]]


@pytest.mark.parametrize("crop,scale_range,pad_value,flip", [
    ((96, 80), (0.5, 2.0), 0, True),        # UP's range: crops inside the scaled frame, and padded ones
    ((300, 200), (0.5, 1.0), 0, True),     # crop larger than every scaled frame: padding on both axes
    ((128, 128), (0.75, 1.5), 127, False),  # a grey pad colour, no flip
])
def test_device_augmentation_equals_the_reference_on_the_same_draws(frames, crop, scale_range, pad_value, flip):
    rng = random.Random(7)
    draws = [draw_augmentation(rng, tuple(label.shape), crop, scale_range, flip) for _, label in frames for _ in range(3)]
    pairs = [pair for pair in frames for _ in range(3)]
    assert any(d.flip for d in draws) == flip and any(d.height < crop[1] for d in draws)
    batch = collate_raw([(image, label, d.as_tensor()) for (image, label), d in zip(pairs, draws)])
    images, labels = TrainTransform(crop, pad_value, IMAGENET_MEAN, IMAGENET_STD)(batch, torch.device("cpu"))
    assert images.shape == (len(draws), 3, crop[1], crop[0]) and labels.dtype == torch.int64
    for i, ((image, label), d) in enumerate(zip(pairs, draws)):
        # The loader's labels are labelIds as stored; the official table maps them (the padding's 255 stays 255).
        expected_image, expected_label = reference_sample(image, torch.from_numpy(LABEL_TO_TRAIN[label.numpy()]), d,
                                                          crop, pad_value)
        torch.testing.assert_close(images[i], expected_image, rtol=0, atol=1e-4)
        assert torch.equal(labels[i], expected_label), i


def test_evaluation_input_equals_normalising_then_resizing(frames):
    image, _ = frames[0]
    got = EvalTransform((160, 80), IMAGENET_MEAN, IMAGENET_STD)(image, torch.device("cpu"))
    reference = F.interpolate(((image.permute(2, 0, 1).float() - MEAN) / STD)[None], size=(80, 160), mode="bilinear",
                              align_corners=False)
    torch.testing.assert_close(got, reference, rtol=0, atol=1e-4)
    same_size = EvalTransform((256, 128), IMAGENET_MEAN, IMAGENET_STD)(image, torch.device("cpu"))
    torch.testing.assert_close(same_size, ((image.permute(2, 0, 1).float() - MEAN) / STD)[None], rtol=0, atol=1e-6)


def test_draws_are_ups_scale_split_and_stay_inside_the_padded_frame():
    crop = (96, 64)
    draws = [draw_augmentation(random.Random(key), (128, 256), crop, (0.5, 2.0), True) for key in range(4000)]
    scales = [d.height / 128 for d in draws]
    below = sum(s < 1 for s in scales) / len(scales)
    assert 0.46 < below < 0.54  # UP: half the draws in [0.5, 1), half in [1, 2)
    assert min(scales) >= 0.5 - 1 / 128 and max(scales) < 2.0
    assert 0.46 < sum(d.flip for d in draws) / len(draws) < 0.54
    for d in draws:
        assert d.width == int(256 * (d.width / 256)) and 0 <= d.top <= max(d.height, 64) - 64
        assert 0 <= d.left <= max(d.width, 96) - 96
    assert draw_augmentation(random.Random(5), (128, 256), crop, (0.5, 2.0), True) == draws[5]
    assert not any(d.flip for d in (draw_augmentation(random.Random(k), (128, 256), crop, (0.5, 2.0), False)
                                    for k in range(50)))


def pipeline_batches(samples, world: World, per_rank: int, start: int, count: int, workers: int = 0):
    """`count` training batches of `world.rank` from iteration `start`, through the real loader and transform."""
    sampler = ShardedTrainSampler(len(samples), per_rank, world, seed=3)
    dataset = CityscapesTrain(samples, [96, 64], [0.5, 2.0], True)
    loader = train_loader(dataset, sampler, per_rank, workers, torch.device("cpu"), seed=3)
    transform = TrainTransform((96, 64), 0, IMAGENET_MEAN, IMAGENET_STD)
    batches = endless_batches(loader, sampler, start)
    return [transform(next(batches), torch.device("cpu")) for _ in range(count)]


def test_batches_are_the_same_on_one_and_two_processes_with_workers_and_after_a_resume(synthetic_root: Path):
    samples = find_samples(synthetic_root, "train")[:12]  # 3 batches of 4 an epoch: 7 steps cross two epoch ends
    single = pipeline_batches(samples, World(0, 1), 4, 0, 7)
    ranks = [pipeline_batches(samples, World(rank, 2), 2, 0, 7) for rank in (0, 1)]
    for step, (images, labels) in enumerate(single):
        for rank, batches in enumerate(ranks):  # the global batch dealt round-robin: rank r holds r, r + 2
            assert torch.equal(batches[step][0], images[rank::2]) and torch.equal(batches[step][1], labels[rank::2])
    assert not torch.equal(single[0][0], single[3][0])  # a new epoch, a new order and new draws
    resumed = pipeline_batches(samples, World(0, 1), 4, 4, 3, workers=1)  # resumed mid-epoch, decoded by a worker
    for (images, labels), (expected_images, expected_labels) in zip(resumed, single[4:]):
        assert torch.equal(images, expected_images) and torch.equal(labels, expected_labels)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_device_augmentation_and_a_training_step_never_wait_for_the_gpu(precision, synthetic_root: Path):
    """The per-step path of `bench run` on a GPU: pinned raw batch -> TrainTransform -> forward, OHEM loss, backward,
    fused SGD (with fp16 the grad scaler's inf check stays on the device), scheduler and EMA. Any host
    synchronisation raises under CUDA's sync debug mode."""
    from harness.config.plan import make_plan
    from harness.config.spec import load_spec
    from harness.engine.train import Trainer
    from harness.models import build_model

    spec = load_spec("df_seg_v1-ema")
    plan = make_plan(spec, "synthetic", 24, precision=precision)
    device = torch.device("cuda")
    trainer = Trainer(plan, build_model(spec), device, World(), progress=False)
    trainer._loss_sum = torch.zeros((), device=device)
    trainer._first_bad = torch.zeros((), dtype=torch.long, device=device)
    dataset = CityscapesTrain(find_samples(synthetic_root, "train")[:4], plan.crop_size, plan.scale_range, plan.flip)
    raw = collate_raw([dataset[(i, i)] for i in range(4)])
    raw = raw._replace(images=[t.pin_memory() for t in raw.images], labels=[t.pin_memory() for t in raw.labels])
    trainer.train_step(*trainer.transform(raw, device))  # first step: cuDNN's choice, allocations, the scaler's state
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            trainer.train_step(*trainer.transform(raw, device))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert trainer.iteration == 4 and torch.isfinite(trainer._loss_sum)
