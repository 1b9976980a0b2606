"""The one exception type the CLI turns into a one-line message instead of a traceback, and where a torchrun worker
leaves that line for its launcher (imported by the CLI before PyTorch: this module loads nothing)."""

from __future__ import annotations

import os
from pathlib import Path


class BenchError(Exception):
    """A user-facing error: the message names the bad input and says how to fix it. The CLI exits with
    `exit_code`: 2 (bad input, the default) or 1 (the work itself failed, e.g. a sweep's job)."""

    exit_code = 2


WORKER_ERRORS = "SEGBENCH_WORKER_ERRORS"  # a folder where each torchrun worker leaves its one-line error


def worker_error_file(folder: Path, rank: int | str) -> Path:
    return folder / f"rank-{rank}"


def record_worker_error(message: str) -> bool:
    """In a torchrun worker, leave `message` for the launcher to report, once for all ranks; False when not a
    worker (the message is then the caller's to show)."""
    folder = os.environ.get(WORKER_ERRORS)
    if not folder or "RANK" not in os.environ:
        return False
    try:
        worker_error_file(Path(folder), os.environ["RANK"]).write_text(message.splitlines()[0] if message else "")
    except OSError:
        return False
    return True
