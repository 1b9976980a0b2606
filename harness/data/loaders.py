"""The loaders that feed training and evaluation: worker processes that decode, pinned memory on a GPU, and
enough batches queued that the device never waits while a worker is between files."""

from __future__ import annotations

import ctypes
from collections.abc import Generator, Iterator, Sequence
from typing import Optional, Protocol

import torch
from torch.utils.data import DataLoader, Sampler

from harness.data.augment import collate_raw
from harness.data.cityscapes import CityscapesEval, CityscapesTrain, Sample, frame_bytes
from harness.data.decoded import DecodedFrames
from harness.data.frame_slots import HELD_BATCHES, FrameSlots, resolved, slots_for

# Batches each worker keeps ready. A batch of full frames is 8 MiB an image in shared memory, so this stays small:
# with a worker per core the queue already spans more batches than a step's worth of decoding.
PREFETCH_BATCHES = 2
EVAL_PREFETCH = 4  # whole images each evaluation worker keeps ready


# glibc's malloc gives a freed array of more than its threshold (128 KiB, rising to the largest freed) back to the
# kernel, and the next frame's array is then faulted in page by page: about 8 ms a 2048x1024 sample on a 2-core VM,
# a fifth of the decode. A worker keeps its frames' memory instead (32 MiB: mallopt's largest threshold).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)
KEPT_ARRAY_BYTES, KEPT_FREE_BYTES = 32 << 20, 512 << 20


def keep_freed_memory(worker_id: int = 0) -> None:
    """A loader worker's `worker_init_fn`: large freed arrays stay in the process for the next frame (glibc only;
    elsewhere nothing changes)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(M_MMAP_THRESHOLD, KEPT_ARRAY_BYTES)
    mallopt(M_TRIM_THRESHOLD, KEPT_FREE_BYTES)


class EpochSampler(Protocol):
    """A sampler whose epochs are numbered and resumable mid-epoch (distributed.ShardedTrainSampler)."""

    batches_per_epoch: int

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None: ...


def batches_to_steady_rate(workers: int, prefetch: int) -> int:
    """Batches a loader delivers before its steady rate: until the queue the workers filled while the first one was
    awaited has drained (until then batches come at no cost), and each worker has written every one of its slots
    once (a first write maps the slot's pages into the worker, some 2,000 faults for a 2048x1024 frame)."""
    return workers * (prefetch + HELD_BATCHES)


def _slots(samples: Sequence[Sample], workers: int, per_batch: int, prefetch: int) -> Optional[FrameSlots]:
    # Only workers hand frames over: without them no slot is made and no file is opened to size one.
    return slots_for(workers, per_batch, prefetch, frame_bytes(samples)) if workers > 0 else None


def train_loader(dataset: CityscapesTrain, sampler: Sampler, batch_size: int, workers: int,
                 device: torch.device, seed: int) -> DataLoader:
    """Decoded frames and their augmentation draws (augment.RawBatch), `batch_size` per step, from `workers`
    persistent processes that hand the frames over through reused shared-memory slots (frame_slots; iterate with
    `batches` or `endless_batches`, which view them)."""
    dataset.slots = _slots(dataset.samples, workers, batch_size, PREFETCH_BATCHES)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True, collate_fn=collate_raw,
                      num_workers=workers, pin_memory=torch.device(device).type == "cuda",
                      persistent_workers=workers > 0, prefetch_factor=PREFETCH_BATCHES if workers else None,
                      worker_init_fn=keep_freed_memory,
                      generator=torch.Generator().manual_seed(seed))  # keeps the global RNG untouched by the loader


def eval_loader(samples: Sequence[Sample], device: torch.device, workers: int = 0,
                decoded: Optional[DecodedFrames] = None, persistent: bool = False) -> DataLoader:
    """Decoded whole images one at a time (image, label, position in `samples`), the next ones decoding in
    `workers` processes while the current one runs (iterate with `batches`, which views the shared slots)."""
    dataset = CityscapesEval(list(samples), decoded)
    dataset.slots = _slots(dataset.samples, workers, 1, EVAL_PREFETCH)
    return DataLoader(dataset, batch_size=None, shuffle=False, num_workers=workers,
                      pin_memory=torch.device(device).type == "cuda", persistent_workers=persistent and workers > 0,
                      prefetch_factor=EVAL_PREFETCH if workers else None, worker_init_fn=keep_freed_memory)


def batches(loader: DataLoader) -> Generator:
    """The loader's batches with the frames workers left in shared slots viewed in place (a GPU loader's pinning
    thread has already copied them out)."""
    for batch in loader:
        yield resolved(batch)


def endless_batches(loader: DataLoader, sampler: EpochSampler, start: int) -> Iterator:
    """The loader's batches from iteration `start` on, epoch after epoch: each epoch's order and augmentation come
    from the sampler's (seed, epoch), so a resumed run continues with exactly the batches it would have had."""
    iteration = start
    while True:
        epoch, offset = divmod(iteration, sampler.batches_per_epoch)
        sampler.set_epoch(epoch, offset)
        for batch in batches(loader):
            yield batch
            iteration += 1
