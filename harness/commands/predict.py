"""`bench predict`: labelId PNGs of a checkpoint's predictions for a split (labels not needed: the test split),
packed into the Cityscapes test-server zip."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from harness.engine.trained import load_for_evaluation
from harness.outputs.predictions import make_submission_zip, predict_split, predictions_dir


def predict_to_zip(checkpoint: str, row: Optional[str], weights: Optional[str], synthetic: bool,
                   data_root: Optional[str], split: str, device: Optional[str], precision: Optional[str],
                   out_dir: Optional[Path], zip_path: Optional[Path], progress: bool = True) -> str:
    """Write labelId PNGs for every image of a split (default: under the checkpoint's run folder, out of git) and
    pack the server's zip (default: <out>.zip); returns the line saying how many, where, and the zip."""
    loaded = load_for_evaluation(checkpoint, row, weights, synthetic, data_root, split, device, precision,
                                 progress=progress)
    out = out_dir if out_dir is not None else predictions_dir(loaded.path, split, loaded.weights)
    written = predict_split(loaded.model, loaded.samples, loaded.plan, loaded.device, out, progress=progress)
    packed = make_submission_zip(out, zip_path or out.with_suffix(".zip"), loaded.samples)
    return f"wrote {len(written)} predictions to {out}; packed {packed}"
