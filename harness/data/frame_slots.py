"""Shared-memory slots that the training loader's workers decode frames into, reused batch after batch.

A worker's tensor normally reaches the main process by being copied into a new shared-memory file, whose pages the
kernel then allocates and zeroes one fault at a time: for a 2048x1024 frame and its label (8 MiB) that cost 5-7 ms
per sample on a 2-core VM, a fifth of the decode itself. Here each worker owns a few slots made once by the main
process; it decodes, copies the pixels into a free slot (warm pages: a fraction of a millisecond) and sends only a
`SlotTensor` (which slot, where, what shape). The main process views the slot where the batch is used (or copies it
into pinned memory on a GPU, `SlotTensor.pin_memory`) and hands the slot back once nothing refers to it any more:
every view, reshape and NumPy array of a slot holds a reference to its storage, so a slot is reused only when that
count is back to the pool's own. A worker without a free slot, or a frame larger than a slot, falls back to the plain
tensor path, so the slots change how fast the pixels travel, never which pixels arrive."""

from __future__ import annotations

import logging
import os
import resource
import threading
import uuid
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch.utils.data import get_worker_info

log = logging.getLogger(__name__)

SHM = Path("/dev/shm")
SHM_SHARE = 4  # the slots take at most this fraction of /dev/shm's free space (the batches in flight need the rest)
FD_SHARE = 4  # and at most this fraction of the open-file limit
HELD_BATCHES = 2  # batches whose slots the main process still holds: the one in use and the one before it

_POOLS: weakref.WeakValueDictionary[str, FrameSlots] = weakref.WeakValueDictionary()  # the main process's pools


def _use_count(slot: torch.Tensor) -> int:
    # The storage's reference count: the pool's tensor, the temporary storage object of this call, and one for
    # each tensor (view, reshape, NumPy array) still made from the slot.
    return torch._C._storage_Use_Count(slot.untyped_storage()._cdata)


@dataclass(frozen=True)
class SlotTensor:
    """A uint8 tensor a worker left in slot `slot` of pool `pool` at byte `offset`: what travels instead of it."""

    pool: str
    slot: int
    offset: int
    shape: tuple[int, ...]
    parts: int  # the SlotTensors in this slot (an image and its label): it is handed back after all are viewed

    def tensor(self) -> torch.Tensor:
        """The pixels as a view of the slot (main process)."""
        return _POOLS[self.pool].view(self)

    def pin_memory(self, device: Any = None) -> torch.Tensor:
        """A pinned copy (the DataLoader's pin-memory thread calls this); the slot is free as soon as it is made."""
        return self.tensor().pin_memory()


Frame = torch.Tensor | SlotTensor  # what a training sample's image or label is until the main process views it


class FrameSlots:
    """`workers` x `per_worker` slots of `slot_bytes` each, in shared memory, made by the main process before the
    workers start (they inherit or unpickle it)."""

    def __init__(self, workers: int, per_worker: int, slot_bytes: int):
        self.key = uuid.uuid4().hex
        self.per_worker, self.slot_bytes = per_worker, slot_bytes
        self.slots = [torch.empty(slot_bytes, dtype=torch.uint8).share_memory_() for _ in range(workers * per_worker)]
        for slot in self.slots:
            slot.fill_(0)  # the pages allocated once here: a worker's first write to a slot only maps them
        self.free = torch.ones(len(self.slots), dtype=torch.uint8).share_memory_()  # 1: its worker may fill it
        self._baseline = _use_count(self.slots[0]) if self.slots else 0
        self._unviewed: dict[int, int] = {}  # main process: slots not handed back -> their parts not yet viewed
        self._lock = threading.Lock()  # the pin-memory thread and the main thread may both view slots
        self._cursor = 0  # worker process: where its search for a free slot starts
        _POOLS[self.key] = self

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_lock"], state["_unviewed"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _lock=threading.Lock(), _unviewed={})

    # --- in a worker -------------------------------------------------------------------------------------------

    def put(self, image: np.ndarray, label: np.ndarray) -> Optional[tuple[SlotTensor, SlotTensor]]:
        """Copy `image` and `label` into one of this worker's free slots; None outside a worker, when the pair is
        larger than a slot, or when every slot of this worker is still in use in the main process."""
        info = get_worker_info()
        if info is None or image.nbytes + label.nbytes > self.slot_bytes:
            return None
        first = info.id * self.per_worker
        for step in range(self.per_worker):
            index = first + (self._cursor + step) % self.per_worker
            if self.free[index]:
                self._cursor = (index - first + 1) % self.per_worker
                self.free[index] = 0
                pixels = self.slots[index].numpy()
                pixels[: image.nbytes] = image.reshape(-1)
                pixels[image.nbytes : image.nbytes + label.nbytes] = label.reshape(-1)
                return (SlotTensor(self.key, index, 0, image.shape, parts=2),
                        SlotTensor(self.key, index, image.nbytes, label.shape, parts=2))
        return None

    # --- in the main process -----------------------------------------------------------------------------------

    def view(self, ref: SlotTensor) -> torch.Tensor:
        size = int(np.prod(ref.shape))
        view = self.slots[ref.slot][ref.offset : ref.offset + size].view(ref.shape)
        with self._lock:
            self._unviewed[ref.slot] = max(0, self._unviewed.get(ref.slot, ref.parts) - 1)  # a part viewed again
            self._hand_back_unused()
        return view

    def _hand_back_unused(self) -> None:
        # A slot goes back once every part in it has been viewed (an image viewed and dropped before its label is
        # viewed must not free the label) and no view of it is left.
        for index in [i for i, left in self._unviewed.items()
                      if left == 0 and _use_count(self.slots[i]) == self._baseline]:
            del self._unviewed[index]
            self.free[index] = 1


def resolved(value: Any) -> Any:
    """`value` with every SlotTensor in it (in lists and tuples, as a batch holds them) replaced by its view."""
    if isinstance(value, SlotTensor):
        return value.tensor()
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a NamedTuple batch (augment.RawBatch)
        return type(value)(*(resolved(item) for item in value))
    if isinstance(value, (list, tuple)):
        return type(value)(resolved(item) for item in value)
    return value


def slots_for(workers: int, samples_per_batch: int, prefetch: int, frame_bytes: int) -> Optional[FrameSlots]:
    """Enough slots that a worker rarely waits for one: its prefetched batches, the batch being used and the one
    before it (handed back when the next is viewed); fewer where /dev/shm is short, none without workers."""
    if workers <= 0 or frame_bytes <= 0:
        return None
    per_worker = samples_per_batch * (prefetch + HELD_BATCHES)
    try:
        stats = os.statvfs(SHM)
        per_worker = min(per_worker, stats.f_bavail * stats.f_frsize // SHM_SHARE // (frame_bytes * workers))
    except OSError:
        pass  # no /dev/shm to ask (PyTorch shares through another folder): the default count
    # Each slot keeps a file descriptor open in every process, beside the ones the batches in flight need.
    per_worker = min(per_worker, resource.getrlimit(resource.RLIMIT_NOFILE)[0] // FD_SHARE // workers)
    if per_worker < 1:
        log.info("no shared frame slots: /dev/shm or the open-file limit is too small for %d workers of %d-byte "
                 "frames", workers, frame_bytes)
        return None
    return FrameSlots(workers, per_worker, frame_bytes)
