"""`bench sweep`, `bench sweep status`, `bench sweep cancel` (harness.launch.sweep does the work)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Optional

from harness.launch.sweep import SweepOptions, cancel, render_status
from harness.launch.sweep import sweep as launch_sweep


def sweep(options: SweepOptions, echo: Callable[[str], None] = print) -> None:
    launch_sweep(options, echo=echo)


def status(sweep_dir: Optional[Path]) -> str:
    return render_status(sweep_dir)


def cancel_jobs(sweep_dir: Optional[Path]) -> list[str]:
    return cancel(sweep_dir)
