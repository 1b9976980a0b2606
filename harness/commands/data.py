"""`bench data`: write the synthetic dataset, decode a tree into the decoded cache, check a whole tree."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from harness.data.check import check_tree, format_report
from harness.data.cityscapes import find_samples
from harness.data.decoded import cached_or_built
from harness.data.source import check_data_options, cityscapes_root, synthetic_root
from harness.data.synthetic import write_synthetic
from harness.errors import BenchError

log = logging.getLogger(__name__)


def synthetic(out: Path, seed: int, train_images: int, val_images: int) -> str:
    if out.exists() and any(out.iterdir()):
        raise BenchError(f"--out {out} exists and is not empty; choose a new folder")
    write_synthetic(out, seed=seed, train_images=train_images, val_images=val_images)
    return f"wrote {train_images} train and {val_images} val images to {out}"


def cache(data_root: Optional[str], out: Path, splits: str) -> None:
    root = cityscapes_root(data_root, allow_synthetic_hint=False)
    for split in [s.strip() for s in splits.split(",") if s.strip()]:
        cached_or_built(out, root, split, find_samples(root, split), echo=log.info)


def check(data_root: Optional[str], workers: Optional[int], subset: bool, full: bool = False,
          synthetic: bool = False) -> tuple[str, int]:
    if synthetic:
        check_data_options(synthetic, data_root)
        data_root = str(synthetic_root(progress=False))
    report = check_tree(data_root, workers=workers, official=not subset, full=full)
    return format_report(report), 0 if report.ok else 1
