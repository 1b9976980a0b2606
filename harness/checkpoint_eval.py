"""`bench eval` and `bench predict`: a trained checkpoint scored or exported as the official tools expect."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from harness import checkpoint, paths
from harness.data.cityscapes import CLASS_NAMES, find_samples
from harness.distributed import World
from harness.errors import BenchError
from harness.evaluate import TestMode, evaluate_split, predict_split
from harness.export import make_submission_zip
from harness.models import build_model, check_implemented
from harness.results import git_commit, package_versions, utc_now
from harness.run_folder import RunFolder
from harness.finish import end_run, finish_run, run_tags
from harness.runner import RunOptions, pick_device, resolve_data_root, resolve_precision
from harness.spec import Spec, load_spec
from harness.tracking import JOURNAL_DIR, Tracker

EVAL_RUNS = "eval"  # runs/<dataset>/<row>/eval/<stamp>/: beside the row's training runs, never taken for one


@dataclass
class EvalOptions:
    row: Optional[str]  # None: the row the checkpoint was trained for
    checkpoint: str
    split: str = "val"
    weights: Optional[str] = None  # "ema" or "raw"; default: ema for EMA rows
    synthetic: bool = False
    data_root: Optional[str] = None
    tracking_uri: Optional[str] = None
    device: Optional[str] = None
    precision: Optional[str] = None
    save_predictions: Optional[str] = None
    num_panels: int = 4
    progress: bool = True
    offline_tracking: bool = False


def load_weights(spec: Spec, path: Path, weights: str, state: dict[str, Any]) -> nn.Module:
    """The row's model with the raw or EMA weights of a segbench checkpoint's `state`, every tensor matched."""
    state_dict = state.get("model") if weights == "raw" else state.get("ema")
    if state_dict is None:
        raise BenchError(f"checkpoint {path} has no EMA weights (its row trained without EMA); use --weights raw")
    model = build_model(spec)  # every tensor comes from the checkpoint
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as exc:
        detail = next((line.strip() for line in str(exc).splitlines()[1:] if line.strip()), str(exc))
        raise BenchError(f"checkpoint {path} does not fit row {spec.row}: {detail}") from None
    return model


@dataclass
class Prepared:
    """What `bench eval` and `bench predict` both need: the row, the loaded model, the split's images."""
    spec: Spec
    model: nn.Module
    device: torch.device
    precision: str
    checkpoint_path: Path
    weights: str
    samples: list
    data_root: Path
    dataset: str
    test_size: list[int]


def _prepare(options: EvalOptions) -> Prepared:
    checkpoint_path = Path(options.checkpoint).expanduser()
    state = checkpoint.load(checkpoint_path)  # a bad file fails before the dataset is touched
    row = options.row or state.get("spec", {}).get("row")
    if not row:
        raise BenchError(f"checkpoint {checkpoint_path} does not name its row; pass --row")
    options = replace(options, row=row)
    spec = load_spec(row)
    check_implemented(spec)
    world = World()
    device = pick_device(options.device, world)
    precision = resolve_precision(options.precision, device)
    weights = options.weights or ("ema" if spec.columns.ema else "raw")
    if weights not in ("ema", "raw"):
        raise BenchError(f"--weights {weights}: use ema or raw")
    model = load_weights(spec, checkpoint_path, weights, state).to(device)
    data_root, dataset = resolve_data_root(
        RunOptions(row=options.row, synthetic=options.synthetic, data_root=options.data_root,
                   progress=options.progress), world)
    samples = find_samples(data_root, options.split, require_labels=False)
    test_size = spec.synthetic.test_size if dataset == "synthetic" else spec.columns.test_size
    return Prepared(spec, model, device, precision, checkpoint_path, weights, samples, data_root, dataset, test_size)


def evaluate_checkpoint(options: EvalOptions) -> dict[str, Any]:
    """Score a checkpoint on a labelled split, log it to MLflow as an evaluation run (tag kind=eval, named
    "eval <row> ..." so it is never taken for a training run) and write a result record (kind "eval")."""
    prepared = _prepare(options)
    spec, model, device, precision = prepared.spec, prepared.model, prepared.device, prepared.precision
    checkpoint_path, weights, dataset, test_size = prepared.checkpoint_path, prepared.weights, prepared.dataset, prepared.test_size
    mode = TestMode.from_spec(spec, test_size)

    tracker = Tracker(options.tracking_uri or paths.default_tracking_uri(), dataset, offline=options.offline_tracking)
    commit = git_commit()
    folder = RunFolder.create(paths.runs_dir() / dataset / spec.row / EVAL_RUNS, kind="eval", row=spec.row,
                              dataset=dataset, tracking_uri=tracker.tracking_uri)
    params = {**{k: v for k, v in spec.flat().items() if k.startswith("model.")},
              "checkpoint": str(checkpoint_path), "weights": weights, "split": options.split,
              "test_size": test_size, "test_mode": mode.describe(), "precision": precision,
              "data.root": str(prepared.data_root), "device": device.type}
    started = time.perf_counter()
    try:
        run_id = tracker.start(folder.path / JOURNAL_DIR, f"eval {spec.row} ({weights} weights, {options.split})",
                               params, run_tags(spec, dataset, commit, "eval", "bench eval", weights=weights,
                                                checkpoint=str(checkpoint_path)))
        folder.update(mlflow_run_id=run_id)
        tracker.log_text(json.dumps(spec.to_dict(), indent=2), "spec.json")
        panels_dir = tracker.artifact_path("panels/.keep").parent
        metrics = evaluate_split(
            model, prepared.samples, spec, device, test_size=test_size, mode=mode, precision=precision,
            save_predictions_dir=Path(options.save_predictions) if options.save_predictions else None,
            panels_dir=panels_dir if options.num_panels else None, num_panels=options.num_panels,
            progress=options.progress, desc=f"eval {weights}")
        per_class = dict(zip(CLASS_NAMES, metrics.iou))
        suffix = "_ema" if weights == "ema" else ""  # the names training runs give the same weights
        record = {
            "kind": "eval", "row": spec.row, "dataset": dataset, "split": options.split, "weights": weights,
            "checkpoint": str(checkpoint_path), "miou": metrics.miou, "pixel_accuracy": metrics.pixel_accuracy,
            "per_class_iou": per_class, "test_size": test_size, "test_mode": mode.describe(),
            "device": device.type, "precision": precision, "wall_time_s": round(time.perf_counter() - started, 1),
            "git_commit": commit, "versions": package_versions(), "mlflow_run_id": run_id, "time": utc_now(),
        }
        return finish_run(spec, tracker, record, folder, headline=metrics.miou,
                          metrics={f"val/miou{suffix}": metrics.miou, f"val/pixel_accuracy{suffix}": metrics.pixel_accuracy},
                          step=0, per_class={f"val_iou{suffix}": per_class},
                          panels=sorted(panels_dir.glob("*.png")))
    except BaseException:
        end_run(folder, tracker, "FAILED")
        raise


def predict_to_zip(options: EvalOptions, out_dir: Path, zip_path: Optional[Path]) -> tuple[list[Path], Optional[Path]]:
    """Write labelId PNGs for every image of a split (labels not needed) and pack the server's zip."""
    p = _prepare(options)
    written = predict_split(p.model, p.samples, p.spec, p.device, out_dir, test_size=p.test_size, precision=p.precision,
                            progress=options.progress)
    packed = make_submission_zip(out_dir, zip_path, p.samples) if zip_path is not None else None
    return written, packed
