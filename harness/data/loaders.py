"""The loaders that feed training and evaluation: worker processes that decode, pinned memory on a GPU, and
enough batches queued that the device never waits while a worker is between files."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Optional, Protocol

import torch
from torch.utils.data import DataLoader, Sampler

from harness.data.augment import collate_raw
from harness.data.cityscapes import CityscapesEval, CityscapesTrain, Sample
from harness.data.decoded import DecodedFrames

# Batches each worker keeps ready. A batch of full frames is 8 MiB an image in shared memory, so this stays small:
# with a worker per core the queue already spans more batches than a step's worth of decoding.
PREFETCH_BATCHES = 2


class EpochSampler(Protocol):
    """A sampler whose epochs are numbered and resumable mid-epoch (distributed.ShardedTrainSampler)."""

    batches_per_epoch: int

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None: ...


def train_loader(dataset: CityscapesTrain, sampler: Sampler, batch_size: int, workers: int,
                 device: torch.device, seed: int) -> DataLoader:
    """Decoded frames and their augmentation draws (augment.RawBatch), `batch_size` per step, from `workers`
    persistent processes."""
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True, collate_fn=collate_raw,
                      num_workers=workers, pin_memory=torch.device(device).type == "cuda",
                      persistent_workers=workers > 0, prefetch_factor=PREFETCH_BATCHES if workers else None,
                      generator=torch.Generator().manual_seed(seed))  # keeps the global RNG untouched by the loader


def eval_loader(samples: Sequence[Sample], device: torch.device, workers: int = 0,
                decoded: Optional[DecodedFrames] = None, persistent: bool = False) -> DataLoader:
    """Decoded whole images one at a time (image, label, position in `samples`), the next ones decoding in
    `workers` processes while the current one runs."""
    return DataLoader(CityscapesEval(list(samples), decoded), batch_size=None, shuffle=False, num_workers=workers,
                      pin_memory=torch.device(device).type == "cuda", persistent_workers=persistent and workers > 0,
                      prefetch_factor=4 if workers else None)


def endless_batches(loader: DataLoader, sampler: EpochSampler, start: int) -> Iterator:
    """The loader's batches from iteration `start` on, epoch after epoch: each epoch's order and augmentation come
    from the sampler's (seed, epoch), so a resumed run continues with exactly the batches it would have had."""
    iteration = start
    while True:
        epoch, offset = divmod(iteration, sampler.batches_per_epoch)
        sampler.set_epoch(epoch, offset)
        for batch in loader:
            yield batch
            iteration += 1
