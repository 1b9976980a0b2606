"""Which dataset a command reads: Cityscapes at `--data-root` (or $CITYSCAPES_DATASET), or the generated synthetic
dataset in the same layout."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from harness import paths
from harness.data.roots import check_root
from harness.errors import BenchError

DATA_ROOT_ENV = "CITYSCAPES_DATASET"


def cityscapes_root(data_root: Optional[str], allow_synthetic_hint: bool = True) -> Path:
    """The Cityscapes folder `--data-root` or $CITYSCAPES_DATASET names; one line when none is given or it is no
    folder."""
    root = data_root or os.environ.get(DATA_ROOT_ENV)
    if not root:
        hint = ", or --synthetic for the synthetic dataset" if allow_synthetic_hint else ""
        raise BenchError(f"no dataset given: pass --data-root DIR (or set {DATA_ROOT_ENV}){hint}")
    return check_root(Path(root).expanduser())


def synthetic_root(progress: bool = True) -> Path:
    """The synthetic dataset under the cache folder, generated on first use."""
    from harness.data.synthetic import ensure_synthetic  # numpy and the drawing code: not for the option checks

    try:
        return ensure_synthetic(paths.cache_dir(), seed=0, progress=progress)
    except OSError as exc:
        raise BenchError(f"cannot write the synthetic dataset under {paths.cache_dir()} ({exc.strerror or exc}); "
                         "free space or make it writable, or set SEGBENCH_CACHE to another folder") from None


def check_data_options(synthetic: bool, data_root: Optional[str]) -> None:
    if synthetic and data_root:
        raise BenchError("--synthetic and --data-root exclude each other; pass one")
