"""The launchers `bench sweep` runs jobs with and their defaults: torch-free, so the command line can offer them
without loading the launch layer (harness.launch.sweep builds the executors)."""

from __future__ import annotations

EXECUTORS = ("slurm", "local")  # Slurm through submitit, or submitit's local executor (this machine)
DEFAULT_GPUS = {"slurm": 8, "local": 1}  # every table row trained on 8 GPUs; a local machine is for small runs
DEFAULT_MAX_REQUEUES = 20  # a 89k-iteration row may cross many time limits; preemptions count too
