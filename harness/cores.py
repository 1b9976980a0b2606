"""The CPU cores a process may use, shared fairly between the processes that run beside it.

A training process that starts intra-op threads and loader workers for the whole machine while others do the
same oversubscribes the cores many times over (OpenMP threads spin while they wait), and every run slows down far
more than its share. So each process takes its part of the cores it was given:

- the cores given to this job on this node: `SEGBENCH_CORES` (set by `bench sweep` for each local job: the
  machine's cores divided by the jobs it runs at once), else Slurm's `SLURM_CPUS_PER_TASK`, else the cores this
  process may run on (its CPU affinity);
- divided by the training processes of the job on this node (torchrun's local processes);
- `OMP_NUM_THREADS`, when set, is the intra-op thread count as it says.
"""

from __future__ import annotations

import os
from typing import Optional

CORES_ENV = "SEGBENCH_CORES"  # cores given to one job on this node, by whoever runs several side by side


def _positive_int(value: Optional[str]) -> Optional[int]:
    try:
        number = int(str(value).strip())
    except ValueError:
        return None
    return number if number >= 1 else None


def machine_cores() -> int:
    """The cores this process may run on (its affinity mask, e.g. a cgroup or `taskset`), else the CPU count."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def job_cores() -> int:
    """The cores given to this job on this node: `SEGBENCH_CORES`, else `SLURM_CPUS_PER_TASK`, else the machine's;
    never more than the process may run on."""
    for name in (CORES_ENV, "SLURM_CPUS_PER_TASK"):
        given = _positive_int(os.environ.get(name))
        if given is not None:
            return min(given, machine_cores())
    return machine_cores()


def process_cores(processes_on_this_node: int) -> int:
    """One training process's share of the job's cores on this node (at least one)."""
    return max(1, job_cores() // max(1, processes_on_this_node))


def intra_op_threads(processes_on_this_node: int) -> int:
    """Intra-op threads of one training process: `OMP_NUM_THREADS` when set, else its share of the cores."""
    return _positive_int(os.environ.get("OMP_NUM_THREADS")) or process_cores(processes_on_this_node)


def loader_workers(processes_on_this_node: int) -> int:
    """Data-loader processes for each training process when the spec leaves it to the machine: its share of the
    cores, one kept for the training loop (at least one worker)."""
    return max(1, process_cores(processes_on_this_node) - 1)
