"""The dataset folder a command was given, checked before anything heavy loads (no PyTorch here): a missing
folder is answered in a fraction of a second."""

from __future__ import annotations

from pathlib import Path

from harness.errors import BenchError


def check_root(root: Path) -> Path:
    """The dataset folder, or a one-line error saying what it is instead."""
    root = Path(root)
    fix = "pass --data-root (or set CITYSCAPES_DATASET) to the folder holding leftImg8bit/ and gtFine/"
    if root.is_file():
        raise BenchError(f"Cityscapes root {root} is a file, not a folder; {fix}")
    if not root.is_dir():
        raise BenchError(f"Cityscapes root {root} does not exist; {fix}")
    return root
