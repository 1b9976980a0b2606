"""Multi-process training on PyTorch's own engine: torchrun launches, torch.distributed synchronises.

`bench run --gpus N` re-executes itself under torchrun; each worker reads its rank from the
environment torchrun sets. The global batch stays the spec's, whatever the world size.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import random
import shutil
import signal
import socket
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from harness.cores import process_cores
from harness.errors import WORKER_ERRORS, BenchError, worker_error_file

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1  # processes of this run on this node

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def world_from_env() -> World:
    env = os.environ
    return World(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)),
                 int(env.get("LOCAL_WORLD_SIZE", 1)))


def init(world: World, device_type: str) -> None:
    if world.distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor) -> None:
    """Sum `tensor` over the processes, in place (nothing to do in a single process)."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)


def broadcast_tensors(tensors: Sequence[torch.Tensor], src: int = 0) -> None:
    """Overwrite `tensors` (same dtype and device) with `src`'s, in place, in one collective."""
    if not dist.is_initialized() or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.broadcast(flat, src=src)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def broadcast_object(value, src: int = 0):
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]


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


def _loopback_interface() -> Optional[str]:
    try:
        return next((name for _, name in socket.if_nameindex() if name.startswith("lo")), None)
    except OSError:
        return None


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):
        return False


def _bind_store(host: str, port: Optional[int]) -> tuple[int, dist.TCPStore]:
    """The rendezvous store's server, listening on `host` only.

    torchrun's TCPStore binds every interface; a TCPStore server listening on a socket we bound ourselves is
    shared, in this process, with torchrun's own store of the same port (multi_tenant), so torchrun binds nothing.
    """
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port or 0))
    except OSError as exc:
        sock.close()
        raise BenchError(f"cannot listen on {host}:{port or 0} for the rendezvous ({exc.strerror or exc}); "
                         "choose another --master-port, or check --master-addr is this node's address") from None
    sock.listen(128)
    port = sock.getsockname()[1]
    # The store's server owns the descriptor from now on and closes it itself.
    store = dist.TCPStore(host, port, None, True, multi_tenant=True, wait_for_workers=False,
                          master_listen_fd=sock.detach(), use_libuv=True)
    return port, store


def launch(argv: Sequence[str], nproc_per_node: int, nnodes: int = 1, node_rank: int = 0,
           master_addr: Optional[str] = None, master_port: Optional[int] = None) -> int:
    """Run `python -m harness.cli <argv>` under torchrun; returns the launcher's exit status.

    One node rendezvouses on 127.0.0.1 and its process groups talk over loopback: nothing listens beyond this
    machine. Several nodes rendezvous on --master-addr, where node 0 listens on that address only.
    """
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    if nnodes > 1 and not master_addr:
        raise BenchError(f"--nnodes {nnodes} needs --master-addr (node 0's address, the same on every node)")
    host = "127.0.0.1" if nnodes == 1 or master_addr is None else master_addr
    store = None
    if node_rank == 0:
        port, store = _bind_store(host, master_port)
    else:
        port = master_port or 29500
    saved = {k: os.environ.get(k) for k in (WORKER_ERRORS, "GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME",
                                            "OMP_NUM_THREADS")}
    errors = tempfile.mkdtemp(prefix="segbench-workers-")
    os.environ[WORKER_ERRORS] = errors
    # Each worker's share of this node's cores (torchrun would give every worker one thread, whatever the cores);
    # a value the user set stands.
    os.environ.setdefault("OMP_NUM_THREADS", str(process_cores(nproc_per_node)))
    loopback = _loopback_interface()
    # One node, or "nodes" that all rendezvous on a loopback address (so all on this machine): gloo and NCCL
    # otherwise listen on the interface of the host name.
    if (nnodes == 1 or _is_loopback(host)) and loopback:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", loopback)
        os.environ.setdefault("NCCL_SOCKET_IFNAME", loopback)
    args = [f"--nproc-per-node={nproc_per_node}", f"--nnodes={nnodes}", f"--node-rank={node_rank}",
            "--rdzv-backend=static", f"--master-addr={host}", f"--master-port={port}",
            "--module", "harness.cli", *argv]
    # torchrun's own lines about tearing workers down ("failed (exitcode: 143)", "Sending process ... SIGTERM")
    # would follow a clean stop too; the outcome is reported below, once, in our words.
    teardown_log = logging.getLogger("torch.distributed.elastic.multiprocessing.api")
    teardown_level = teardown_log.level
    teardown_log.setLevel(logging.CRITICAL)
    try:
        torchrun.main(args)
    except SystemExit as exc:  # torchrun exits through sys.exit on success too
        return int(exc.code or 0)
    except ChildFailedError as exc:
        stopped = stop_exit_code(exc)
        if stopped is not None:  # a stop request: rank 0 checkpointed and said how to resume
            return stopped
        log.error("error: distributed run failed: %s", first_failure(exc, Path(errors)))
        return 1
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        log.error("error: distributed run failed: %s", reason)
        return 1
    finally:
        teardown_log.setLevel(teardown_level)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        shutil.rmtree(errors, ignore_errors=True)
        del store
    return 0


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def stop_exit_code(exc) -> Optional[int]:
    """128 + signal when the workers ended as a stop request ends them: some exited 128 + SIGTERM/SIGINT after
    checkpointing, and the rest did the same or were ended by torchrun's SIGTERM on its way out. None otherwise."""
    codes = [failure.exitcode for failure in exc.failures.values()]
    stops = [code for code in codes if code in {128 + int(s) for s in STOP_SIGNALS}]
    torn_down = {-int(s) for s in STOP_SIGNALS}
    if stops and all(code in stops or code in torn_down for code in codes):
        return max(stops)
    return None


def first_failure(exc, errors: Path) -> str:
    """The first failed worker's own error line (left by `record_worker_error`), else how it ended."""
    rank, failure = exc.get_first_failure()
    left = worker_error_file(errors, rank)
    if left.is_file() and left.read_text().strip():
        return f"rank {rank}: {left.read_text().strip()}"
    if failure.exitcode is not None and failure.exitcode < 0:
        return f"rank {rank} was killed by {failure.signal_name()}"
    return f"rank {rank} exited with code {failure.exitcode} (its output above says why)"
