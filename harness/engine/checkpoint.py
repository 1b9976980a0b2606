"""Training checkpoints: written atomically, the last good ones kept, a damaged one detected on load."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import torch

from harness.errors import BenchError
from harness.files import atomic_output, read_torch_file

log = logging.getLogger(__name__)

FORMAT = "segbench-checkpoint/1"
PREFIX = "ckpt-"
BEST = "best.pt"  # the best evaluation so far (UP's auto_save_best); never pruned


def save(state: dict[str, Any], folder: Path, iteration: int, keep: int) -> Path:
    """Write `state` as ckpt-<iteration>.pt through a temporary file and a rename, then keep the `keep` newest.

    A crash mid-write leaves only a stray temporary file: the previous checkpoints are untouched. best.pt, a link
    to the file it equals, keeps that file's data when its name is pruned.
    """
    path = _write(state, folder / f"{PREFIX}{iteration:08d}.pt")
    for old in checkpoints(folder)[keep:]:
        old.unlink(missing_ok=True)
    return path


def mark_best(path: Path) -> Path:
    """Make best.pt (beside `path`) the checkpoint `path` without writing it again: a hard link, or a copy where the
    filesystem has no hard links. Replaced atomically: best.pt is always the previous best or this one."""
    best = path.parent / BEST
    tmp = path.parent / f".{BEST}.{os.getpid()}.link"
    try:
        tmp.unlink(missing_ok=True)
        try:
            os.link(path, tmp)
        except OSError:  # no hard links here (some network and FUSE filesystems): one copy, flushed
            with atomic_output(tmp) as f, open(path, "rb") as source:
                shutil.copyfileobj(source, f)
        os.replace(tmp, best)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise BenchError(f"cannot write checkpoint {best}: {exc.strerror or exc}; free space or make {best.parent} "
                         "writable (or set SEGBENCH_RUNS to another folder); earlier checkpoints are kept") from None
    return best


def _write(state: dict[str, Any], path: Path) -> Path:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(path) as f:
            torch.save({"format": FORMAT, **state}, f)
    except (OSError, RuntimeError) as exc:  # torch.save reports a failed write (a full disk) as RuntimeError
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else _write_failure(exc)
        raise BenchError(f"cannot write checkpoint {path}: {reason}; free space or make {path.parent} writable "
                         f"(or set SEGBENCH_RUNS to another folder); earlier checkpoints are kept") from None
    return path


def _write_failure(exc: BaseException) -> str:
    """The reason behind torch.save's RuntimeError: the OSError (e.g. 'No space left on device') that the file
    object raised while torch was writing, kept as the exception's context."""
    cause: Optional[BaseException] = exc
    while cause is not None:
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror
        cause = cause.__context__
    text = str(exc)
    return text.splitlines()[0] if text else type(exc).__name__


def checkpoints(folder: Path) -> list[Path]:
    """Checkpoints in `folder`, newest first."""
    return sorted(folder.glob(f"{PREFIX}*.pt"), reverse=True)


def load(path: Path) -> dict[str, Any]:
    """Load one training checkpoint on the CPU; any damage is a one-line error naming the file."""
    state = read_torch_file(path, "checkpoint", "give the path of a ckpt-*.pt file or a run folder")
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise BenchError(f"checkpoint {path} is not a segbench training checkpoint (format {FORMAT})")
    return state


def load_latest(folder: Path) -> tuple[dict[str, Any], Path]:
    """The newest readable checkpoint in `folder`; a damaged newer one is skipped with a warning."""
    candidates = checkpoints(folder)
    if not candidates:
        raise BenchError(f"no checkpoint in {folder}; nothing to resume (start the run again without --resume)")
    for path in candidates:
        try:
            return load(path), path
        except BenchError as exc:
            log.warning("warning: %s; trying the previous checkpoint", exc)
    raise BenchError(f"every checkpoint in {folder} is unreadable; start the run again without --resume")

