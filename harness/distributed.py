"""Multi-process training on PyTorch's own engine: torchrun launches, torch.distributed synchronises.

`bench run --gpus N` re-executes itself under torchrun; each worker reads its rank from the
environment torchrun sets. The global batch stays the spec's, whatever the world size.
"""

from __future__ import annotations

import os
import random
import sys
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from harness.errors import BenchError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def world_from_env() -> World:
    return World(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0)))


def init(world: World, device_type: str) -> None:
    if world.distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_object(value, src: int = 0):
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def per_rank_batch(global_batch: int, world_size: int) -> int:
    if global_batch % world_size:
        raise BenchError(
            f"batch size {global_batch} does not divide over {world_size} processes; "
            f"use a process count that divides it (the global batch is the spec's, whatever the GPU count)"
        )
    return global_batch // world_size


class ShardedTrainSampler(Sampler):
    """Each epoch, one seeded permutation of the dataset, dealt round-robin to the ranks.

    Yields (index, augmentation seed) pairs: the augmentation of a sample depends only on the run
    seed, the epoch and the index, so a run is the same on 1 or N processes and after a resume.
    `skip` drops the first items of the current epoch (resuming mid-epoch).
    """

    def __init__(self, num_samples: int, batch_size: int, world: World, seed: int):
        self.num_samples, self.batch_size, self.world, self.seed = num_samples, batch_size, world, seed
        self.epoch, self.skip = 0, 0
        global_batch = batch_size * world.size
        # Like drop_last: every rank sees the same number of full batches per epoch.
        self.batches_per_epoch = max(num_samples // global_batch, 1)

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch, self.skip = epoch, skip_batches * self.batch_size

    def __len__(self) -> int:
        return self.batches_per_epoch * self.batch_size - self.skip

    def __iter__(self) -> Iterator[tuple[int, int]]:
        rng = random.Random(f"{self.seed}-{self.epoch}")
        order = list(range(self.num_samples))
        rng.shuffle(order)
        needed = self.batches_per_epoch * self.batch_size * self.world.size
        order = (order * (needed // max(len(order), 1) + 1))[:needed]  # tiny datasets: wrap around
        mine = order[self.world.rank :: self.world.size]
        for position in range(self.skip, len(mine)):
            index = mine[position]
            yield index, hash((self.seed, self.epoch, index)) & 0x7FFFFFFF


def shard(items: Sequence, world: World) -> list:
    """Evaluation shard: every item on exactly one rank, none padded or repeated."""
    return list(items[world.rank :: world.size])


def launch(argv: Sequence[str], nproc_per_node: int, nnodes: int = 1, node_rank: int = 0,
           master_addr: Optional[str] = None, master_port: Optional[int] = None) -> int:
    """Run `python -m harness.cli <argv>` under torchrun; returns the launcher's exit status."""
    from torch.distributed import run as torchrun

    args = [f"--nproc-per-node={nproc_per_node}", f"--nnodes={nnodes}", f"--node-rank={node_rank}"]
    if nnodes == 1 and master_addr is None:
        args.append("--standalone")
    else:
        args += [f"--master-addr={master_addr or '127.0.0.1'}", f"--master-port={master_port or 29500}"]
    args += ["--module", "harness.cli", *argv]
    try:
        torchrun.main(args)
    except SystemExit as exc:  # torchrun exits through sys.exit on success too
        return int(exc.code or 0)
    except Exception as exc:  # ChildFailedError: a worker failed; its own message was printed above
        print(f"error: distributed run failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", file=sys.stderr)
        return 1
    return 0
