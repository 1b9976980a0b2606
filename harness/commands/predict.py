"""`bench predict`: labelId PNGs of a checkpoint's predictions for a split (labels not needed: the test split),
packed into the Cityscapes test-server zip."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from harness.engine.trained import load_for_evaluation
from harness.outputs.predictions import make_submission_zip, predict_split


def predict_to_zip(checkpoint: str, row: Optional[str], weights: Optional[str], synthetic: bool,
                   data_root: Optional[str], split: str, device: Optional[str], precision: Optional[str],
                   out_dir: Path, zip_path: Optional[Path], progress: bool = True) -> tuple[list[Path], Optional[Path]]:
    """Write labelId PNGs for every image of a split and pack the server's zip."""
    loaded = load_for_evaluation(checkpoint, row, weights, synthetic, data_root, split, device, precision,
                                 progress=progress)
    written = predict_split(loaded.model, loaded.samples, loaded.plan, loaded.device, out_dir, progress=progress)
    packed = make_submission_zip(out_dir, zip_path, loaded.samples) if zip_path is not None else None
    return written, packed
