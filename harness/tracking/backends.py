"""Tracking backends by registration: a backend is one module registered under its URI scheme (the part before the
first colon, e.g. "tensorboard" of tensorboard:DIR). The module gives `open_sink(uri) -> Sink` and may give
`check_store(uri, writers) -> StoreCheck` (what `bench doctor` and a starting run say about the store) and
`read_run(uri, run_id) -> StoredRun` (a run read back, for `bench compare RUN_ID`) and `prepare_store(uri)` (what
a sweep does once before its jobs start). A URI whose
scheme no backend claims goes to the default backend, MLflow's (sqlite:, http(s)://, file:, a folder, ...).

Adding a backend is its module plus one `register` call; nothing above this package names a backend.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Optional

from harness.errors import BenchError
from harness.files import existing_parent

if TYPE_CHECKING:
    from harness.tracking.sink import Sink

DEFAULT = "harness.tracking.mlflow_sink"
_BACKENDS: dict[str, str] = {"tensorboard": "harness.tracking.tensorboard_sink"}  # scheme -> module


@dataclass(frozen=True)
class StoreCheck:
    """A backend's view of a store before a run: ok (True / False / None for "cannot tell"), what it found, the fix."""

    ok: Optional[bool]
    detail: str
    fix: str = ""


def folder_store_check(uri: str, root: Path, found: str) -> StoreCheck:
    """A store kept in a folder (`root`, which need not exist yet): fit when the nearest existing folder on its path
    is writable; `found` says what the store is ("event files, one folder per run")."""
    folder = existing_parent(root)
    if not os.access(folder, os.W_OK):
        return StoreCheck(False, f"{uri}: {folder} is not writable", "choose a writable folder")
    return StoreCheck(True, f"{uri}: {found}")


@dataclass(frozen=True)
class StoredRun:
    """A run as its store holds it: its tags, params and each metric's last value."""

    tags: dict[str, str]
    params: dict[str, str]
    metrics: dict[str, float]


def register(scheme: str, module: str) -> None:
    """Send URIs `scheme:...` to the backend module `module` (imported when such a URI is first opened)."""
    if not scheme.isidentifier():
        raise BenchError(f"tracking backend scheme {scheme!r}: give a word such as 'tensorboard'")
    _BACKENDS[scheme] = module


def unregister(scheme: str) -> None:
    _BACKENDS.pop(scheme, None)


def scheme(uri: str) -> str:
    return uri.split(":", 1)[0] if ":" in uri else ""


def backend_module(uri: str) -> ModuleType:
    """The module of the backend that serves `uri`."""
    name = _BACKENDS.get(scheme(uri), DEFAULT)
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise BenchError(f"tracking URI {uri!r}: its backend {name} cannot be imported ({exc}); install what it "
                         "needs or pass another --tracking-uri") from None


def open_sink(uri: str) -> Sink:
    """The sink of the backend that serves `uri`."""
    sink: Sink = backend_module(uri).open_sink(uri)
    return sink


def check_store(uri: str, writers: int, reach: bool = True) -> StoreCheck:
    """The serving backend's check of the store for `writers` concurrent runs (`reach`: it may contact a server);
    "cannot tell" when it has none."""
    module = backend_module(uri)
    check = getattr(module, "check_store", None)
    if check is None:
        return StoreCheck(None, f"{uri}: not checked (its backend has no check)")
    result: StoreCheck = check(uri, writers, reach)
    return result


def prepare_store(uri: str) -> None:
    """Before a sweep's jobs start: the store answers and is ready for runs (a one-line error otherwise)."""
    prepare = getattr(backend_module(uri), "prepare_store", None)
    if prepare is not None:
        prepare(uri)


def read_run(uri: str, run_id: str) -> Optional[StoredRun]:
    """Run `run_id` as the store at `uri` holds it; None when the store has no such run. A backend that cannot read
    runs back is a one-line error."""
    module = backend_module(uri)
    read = getattr(module, "read_run", None)
    if read is None:
        raise BenchError(f"the tracking store at {uri!r} cannot be read back by segbench; give a run folder or a "
                         "result record instead of a run id")
    stored: Optional[StoredRun] = read(uri, run_id)
    return stored
