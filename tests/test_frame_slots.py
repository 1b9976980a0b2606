"""The training loader's shared frame slots (harness.data.frame_slots) and the paired labelId lookup: the pixels that
arrive are the decoder's, whichever way they travel, and a slot is never refilled while anything still views it."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.utils.data._utils.pin_memory import pin_memory

from harness.data import frame_slots
from harness.data.augment import RawBatch
from harness.data.cityscapes import CityscapesTrain, decode_pair, find_samples
from harness.data.frame_slots import FrameSlots
from harness.data.labels import IGNORE_INDEX, TRAIN_ID_TO_LABEL_ID, label_ids_to_train_ids, train_ids_of
from harness.data.loaders import PREFETCH_BATCHES, batches, batches_to_steady_rate, eval_loader, train_loader
from harness.data.synthetic import write_synthetic


def expected_train_ids(label_ids: np.ndarray) -> np.ndarray:
    """Cityscapes' mapping written out from its table: trainId i for labelId TRAIN_ID_TO_LABEL_ID[i], else ignored."""
    out = np.full(label_ids.shape, IGNORE_INDEX, dtype=np.uint8)
    for train_id, label_id in enumerate(TRAIN_ID_TO_LABEL_ID):
        out[label_ids == label_id] = train_id
    return out


@pytest.mark.parametrize("shape", [(64, 128), (63, 127), (1, 1), (0,)])
def test_the_cpu_and_device_lookups_map_every_label_id_as_the_table_does(shape):
    rng = np.random.default_rng(3)
    label_ids = rng.integers(0, 256, shape, dtype=np.uint8)
    if label_ids.size >= 512:  # every labelId as the first and as the second byte of a pair
        label_ids.reshape(-1)[:512] = np.concatenate([np.arange(256), np.arange(256)[::-1]])
    assert np.array_equal(label_ids_to_train_ids(label_ids), expected_train_ids(label_ids))
    strided = label_ids[..., ::2] if label_ids.ndim == 2 else label_ids
    assert np.array_equal(label_ids_to_train_ids(strided), expected_train_ids(strided))
    assert torch.equal(train_ids_of(torch.from_numpy(label_ids)), torch.from_numpy(expected_train_ids(label_ids)))


@pytest.fixture(scope="module")
def frames(tmp_path_factory) -> list:
    """Six labelled 96x48 frames and two 128x64 ones (larger than a slot sized by the first frame)."""
    small = write_synthetic(tmp_path_factory.mktemp("small"), seed=1, train_images=6, val_images=0, size=(96, 48),
                            progress=False)
    large = write_synthetic(tmp_path_factory.mktemp("large"), seed=2, train_images=2, val_images=0, size=(128, 64),
                            progress=False)
    return find_samples(Path(small), "train") + find_samples(Path(large), "train")


def test_a_worker_hands_frames_over_through_slots_and_large_ones_the_plain_way(frames):
    dataset = CityscapesTrain(frames, [32, 32], [0.5, 2.0])
    keys = [(i, i) for i in range(len(frames))]
    held = list(batches(train_loader(dataset, keys, 2, 2, torch.device("cpu"), seed=0)))  # every batch kept alive
    assert dataset.slots is not None and dataset.slots.slot_bytes == 96 * 48 * 4
    arrived = [(image, label) for batch in held for image, label in zip(batch.images, batch.labels)]
    assert len(arrived) == len(frames)
    through_slots = [image.untyped_storage().nbytes() == dataset.slots.slot_bytes for image, _ in arrived]
    assert through_slots[:6] == [True] * 6 and through_slots[6:] == [False, False]
    for sample, (image, label) in zip(frames, arrived):  # nothing was overwritten while held
        expected_image, expected_label = decode_pair(sample)
        assert torch.equal(image, expected_image) and torch.equal(label, expected_label)


def test_a_consumer_holding_every_batch_gets_plain_tensors_once_the_slots_run_out(frames):
    dataset = CityscapesTrain(frames[:6] * 4, [32, 32], [0.5, 2.0])
    keys = [(i, i) for i in range(len(dataset))]
    held = list(batches(train_loader(dataset, keys, 1, 1, torch.device("cpu"), seed=0)))
    assert dataset.slots is not None and len(dataset.slots.slots) == 1 * (2 + 2)  # one sample a batch, 2 prefetched
    for key, batch in enumerate(held):
        expected_image, expected_label = decode_pair(dataset.samples[key])
        assert torch.equal(batch.images[0], expected_image) and torch.equal(batch.labels[0], expected_label)
    slotted = sum(b.images[0].untyped_storage().nbytes() == dataset.slots.slot_bytes for b in held)
    assert slotted == len(dataset.slots.slots)  # the rest came the plain way: no slot is refilled while viewed


@pytest.fixture
def in_worker_zero(monkeypatch):
    monkeypatch.setattr(frame_slots, "get_worker_info", lambda: SimpleNamespace(id=0))


def test_a_slot_is_handed_back_only_when_its_parts_were_viewed_and_no_view_is_left(in_worker_zero):
    slots = FrameSlots(workers=1, per_worker=3, slot_bytes=16)
    image, label = np.arange(12, dtype=np.uint8).reshape(2, 2, 3), np.array([[7, 8], [9, 10]], dtype=np.uint8)
    first, second, third = (slots.put(image + i, label + i) for i in range(3))
    assert first and second and third and slots.put(image, label) is None  # all filled, none free
    assert first[0].tensor().tolist() == image.tolist()  # the image viewed and dropped at once, as pinning does
    second[0].tensor()  # viewing a part of another slot is when the pool hands back what is no longer used
    assert slots.free.tolist() == [0, 0, 0]  # the first slot's label is still to come
    label_view = first[1].tensor()
    assert label_view.tolist() == label.tolist()
    derived = label_view.t().numpy()  # a view of a view, as the device transform makes
    del label_view
    second[1].tensor()
    third[0].tensor()
    assert slots.free.tolist() == [0, 1, 0]  # the second slot: both parts viewed and dropped; the first: still viewed
    del derived
    third[1].tensor()
    assert slots.free.tolist() == [1, 1, 0]  # the third is free at the next look
    assert slots.put(image, label) is not None and slots.free.tolist() == [0, 1, 0]


def test_pinning_a_batch_copies_the_slots_out_and_frees_them(in_worker_zero, monkeypatch):
    # Page-locked memory needs a GPU; a plain copy stands in for torch's pinning, the traversal and hand-back are ours.
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *args, **kwargs: self.clone())
    slots = FrameSlots(workers=1, per_worker=2, slot_bytes=16)
    image, label = np.full((2, 2, 3), 5, dtype=np.uint8), np.full((2, 2), 3, dtype=np.uint8)
    refs, later = slots.put(image, label), slots.put(image, label)
    assert refs is not None and later is not None
    pinned = pin_memory(RawBatch([refs[0]], [refs[1]], torch.zeros(1, 5, dtype=torch.int64)))
    assert isinstance(pinned, RawBatch) and isinstance(pinned.images[0], torch.Tensor)
    assert pinned.images[0].tolist() == image.tolist() and pinned.labels[0].tolist() == label.tolist()
    later[0].tensor()  # the next view hands back the pinned batch's slot: the copies hold none of it
    assert slots.free.tolist() == [1, 0]


def test_the_evaluation_loader_hands_whole_images_over_through_slots_too(frames):
    loader = eval_loader(frames[:6], torch.device("cpu"), workers=2)
    arrived = list(batches(loader))
    slots = loader.dataset.slots  # type: ignore[attr-defined]
    assert [index for _, _, index in arrived] == list(range(6))
    assert all(image.untyped_storage().nbytes() == slots.slot_bytes for image, _, _ in arrived)
    for sample, (image, label, _) in zip(frames, arrived):
        expected_image, expected_label = decode_pair(sample)
        assert torch.equal(image, expected_image) and torch.equal(label, expected_label)


def test_the_slot_count_follows_the_batch_and_stays_within_shared_memory_and_open_files(monkeypatch):
    eight_mib = 2048 * 1024 * 4
    assert frame_slots.slots_for(0, 8, 2, eight_mib) is None  # no workers: frames stay in the process
    monkeypatch.setattr(frame_slots, "FrameSlots", lambda workers, per_worker, slot_bytes: (workers, per_worker))
    monkeypatch.setattr(frame_slots.resource, "getrlimit", lambda _: (1024, 4096))
    monkeypatch.setattr(frame_slots.os, "statvfs", lambda _: SimpleNamespace(f_bavail=64 << 20, f_frsize=4096))
    assert frame_slots.slots_for(2, 3, 2, eight_mib) == (2, 3 * (2 + 2))  # prefetched, in use, the one before
    assert frame_slots.slots_for(16, 8, 2, eight_mib) == (16, 1024 // 4 // 16)  # a quarter of the open files
    monkeypatch.setattr(frame_slots.os, "statvfs", lambda _: SimpleNamespace(f_bavail=8 << 10, f_frsize=4096))
    assert frame_slots.slots_for(2, 8, 2, eight_mib) is None  # 32 MiB of /dev/shm: not a slot a worker


def test_every_slot_has_been_written_once_when_the_loader_reaches_its_steady_rate(frames):
    """bench speed warms up for `batches_to_steady_rate` batches: by then each worker has filled each of its slots
    (a slot's first write is slower: its pages are mapped into the worker then), and not one batch earlier."""
    dataset = CityscapesTrain(frames[:6] * 8, [32, 32], [0.5, 2.0])
    loader = train_loader(dataset, [(i, i) for i in range(len(dataset))], 2, 2, torch.device("cpu"), seed=0)
    steady = batches_to_steady_rate(2, PREFETCH_BATCHES)
    used: list[set[int]] = []
    for batch in loader:  # the batches as the workers sent them: which slot each frame came through
        used.append({ref.slot for ref in [*batch.images, *batch.labels]})
        frame_slots.resolved(batch)  # viewed and dropped: the slots go back
        if len(used) == steady:
            break
    assert dataset.slots is not None
    assert set().union(*used) == set(range(len(dataset.slots.slots)))
    assert set().union(*used[:-1]) != set(range(len(dataset.slots.slots)))
