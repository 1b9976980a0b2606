"""Files written whole or not at all, and PyTorch files read without running their code.

Every write goes to a temporary file of its own (a unique name beside the target, so concurrent writers never
share one), is flushed to disk, then renamed over the target: a reader sees the old file or the new one, never
a part. A failed write leaves nothing behind.
"""

from __future__ import annotations

import os
import pickle
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from harness.errors import BenchError


def _default_file_mode() -> int:
    """The mode `open()` gives a new file: 0o666 less the umask. Linux shows the umask in /proc; elsewhere it can
    only be read by setting it (briefly, which another thread creating a file at that instant would see)."""
    try:
        status = Path("/proc/self/status").read_text()
        umask = int(next(line.split()[1] for line in status.splitlines() if line.startswith("Umask:")), 8)
    except (OSError, StopIteration, ValueError, IndexError):
        umask = os.umask(0o022)
        os.umask(umask)
    return 0o666 & ~umask


def new_temporary_file(directory: Path, prefix: str, suffix: str) -> tuple[int, str]:
    """A new file of a unique name in `directory` (descriptor, path) with the mode any new file would get: mkstemp
    alone makes it 0600, which a record, table or cache renamed into place would keep, unreadable to the rest of a
    team sharing the results folder."""
    handle, name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=directory)
    try:
        os.fchmod(handle, _default_file_mode())
    except BaseException:
        os.close(handle)
        os.unlink(name)
        raise
    return handle, name


@contextmanager
def atomic_output(path: Path, mode: str = "wb") -> Iterator[IO[Any]]:
    """A file object whose contents replace `path` when the block ends without an exception."""
    path = Path(path)
    handle, tmp = new_temporary_file(path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    with atomic_output(path, "wb") as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: Path, text: str) -> Path:
    with atomic_output(path, "w") as f:
        f.write(text)
    return Path(path)


def write_if_changed(path: Path, data: bytes) -> bool:
    """Replace `path` atomically unless it already holds `data`; whether it was written."""
    path = Path(path)
    try:
        if path.read_bytes() == data:
            return False
    except OSError:
        pass
    atomic_write_bytes(path, data)
    return True


def check_writable(folder: Path, what: str, instead: str, create: bool = True) -> None:
    """Fail before any work if `folder` cannot take a new file: one line naming it and the fix (`instead`: the
    other way out, e.g. "pass another --out"). Without `create`, a folder not made yet is judged by the nearest
    one that exists, and nothing is created."""
    folder = Path(folder)
    try:
        if create:
            folder.mkdir(parents=True, exist_ok=True)
            where = folder
        else:
            where = folder.expanduser().absolute()
            while not where.is_dir() and where != where.parent:
                where = where.parent
        with tempfile.NamedTemporaryFile(prefix=".write-check-", dir=where):
            pass
    except OSError as exc:
        raise BenchError(f"{what} {folder} is not writable ({exc.strerror or exc}); make it writable or "
                         f"{instead}") from None


def format_bytes(size: float) -> str:
    """A size for people: '712 KiB', '217 MiB', '2.5 GiB' (binary units, as `du -h` counts)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" or abs(size) >= 100 else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def read_torch_file(path: Path, label: str, fix: str) -> Any:
    """`torch.load(path, weights_only=True)` on the CPU; a missing or unusable file is a one-line BenchError
    starting with `label` and the path (`fix` says what to do about a missing one)."""
    import torch

    if not path.is_file():
        raise BenchError(f"{label} {path} does not exist; {fix}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # A readable file that also pickles Python objects (a class instance, argparse.Namespace, ...).
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        if not found:
            raise BenchError(f"{label} {path} is unreadable (UnpicklingError); it may be truncated or not a "
                             "PyTorch checkpoint") from None
        raise BenchError(f"{label} {path} holds pickled Python objects besides tensors (e.g. {found.group(1)}), which "
                         "weights_only loading refuses to run; if you trust the file, re-save only its state dict "
                         "with torch.save") from None
    except Exception as exc:  # truncated zip, foreign pickle, not a torch file: all mean "unusable"
        raise BenchError(f"{label} {path} is unreadable ({type(exc).__name__}); it may be truncated or not a "
                         "PyTorch checkpoint") from None


def existing_parent(path: Path) -> Path:
    """`path`, or its nearest ancestor that exists (where a file or folder not yet made would go)."""
    path = path.expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path
