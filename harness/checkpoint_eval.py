"""`bench eval` and `bench predict`: a trained checkpoint scored or exported as the official tools expect."""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass
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
from harness.results import git_commit, package_versions, utc_now, write_record
from harness.runner import RunOptions, per_class_csv, pick_device, resolve_data_root, resolve_precision
from harness.spec import Spec, load_spec
from harness.tracking import Tracker


@dataclass
class EvalOptions:
    row: str
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


def load_weights(spec: Spec, path: Path, weights: str) -> nn.Module:
    """The row's model with the raw or EMA weights of a segbench checkpoint, every tensor matched."""
    state = checkpoint.load(path)
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
    spec = load_spec(options.row)
    check_implemented(spec)
    world = World()
    device = pick_device(options.device, world)
    precision = resolve_precision(options.precision, device)
    weights = options.weights or ("ema" if spec.columns.ema else "raw")
    if weights not in ("ema", "raw"):
        raise BenchError(f"--weights {weights}: use ema or raw")
    checkpoint_path = Path(options.checkpoint).expanduser()
    model = load_weights(spec, checkpoint_path, weights).to(device)  # a bad file fails before the dataset is touched
    data_root, dataset = resolve_data_root(
        RunOptions(row=options.row, synthetic=options.synthetic, data_root=options.data_root,
                   progress=options.progress), world)
    samples = find_samples(data_root, options.split, require_labels=False)
    test_size = spec.synthetic.test_size if dataset == "synthetic" else spec.columns.test_size
    return Prepared(spec, model, device, precision, checkpoint_path, weights, samples, data_root, dataset, test_size)


def evaluate_checkpoint(options: EvalOptions) -> dict[str, Any]:
    """Score a checkpoint on a labelled split, log it to MLflow and write a result record (kind "eval")."""
    prepared = _prepare(options)
    spec, model, device, precision = prepared.spec, prepared.model, prepared.device, prepared.precision
    checkpoint_path, weights, dataset, test_size = prepared.checkpoint_path, prepared.weights, prepared.dataset, prepared.test_size
    mode = TestMode.from_spec(spec, test_size)

    tracker = Tracker(options.tracking_uri or paths.default_tracking_uri(), dataset)
    commit = git_commit()
    run_id = tracker.start(spec.row, {
        **spec.flat(), "eval.checkpoint": str(checkpoint_path), "eval.weights": weights, "eval.split": options.split,
        "eval.test_size": test_size, "eval.mode": mode.describe(), "eval.precision": precision,
        "data.root": str(prepared.data_root)}, {
        "row": spec.row, "dataset": dataset, "git_commit": commit, "kind": "eval",
        "reference_miou": " | ".join(repr(v) for v in spec.reference.miou)})
    started = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory() as scratch:
            panels = Path(scratch) / "panels"
            metrics = evaluate_split(
                model, prepared.samples, spec, device, test_size=test_size, mode=mode, precision=precision,
                save_predictions_dir=Path(options.save_predictions) if options.save_predictions else None,
                panels_dir=panels if options.num_panels else None, num_panels=options.num_panels,
                progress=options.progress, desc=f"eval {weights}")
            if panels.is_dir():
                tracker.client.log_artifacts(run_id, str(panels), "panels")
        per_class = dict(zip(CLASS_NAMES, metrics.iou))
        tracker.log_metrics({"val_miou": metrics.miou, "val_pixel_accuracy": metrics.pixel_accuracy}, 0)
        tracker.log_metrics({f"iou_{name.replace(' ', '_')}": v for name, v in per_class.items()}, 0)
        tracker.log_text(per_class_csv(per_class, None), "per_class_iou.csv")
        tracker.log_text(json.dumps(spec.to_dict(), indent=2), "spec.json")
        record = {
            "kind": "eval", "row": spec.row, "dataset": dataset, "split": options.split, "weights": weights,
            "checkpoint": str(checkpoint_path), "miou": metrics.miou, "pixel_accuracy": metrics.pixel_accuracy,
            "per_class_iou": per_class, "test_size": test_size, "test_mode": mode.describe(),
            "device": device.type, "precision": precision, "wall_time_s": round(time.perf_counter() - started, 1),
            "git_commit": commit, "versions": package_versions(), "mlflow_run_id": run_id, "time": utc_now(),
        }
        path = write_record(record)
        tracker.set_tag("result_record", str(path))
    except BaseException:
        tracker.finish("FAILED")
        raise
    tracker.finish("FINISHED")
    record["_path"] = str(path)
    return record


def predict_to_zip(options: EvalOptions, out_dir: Path, zip_path: Optional[Path]) -> tuple[list[Path], Optional[Path]]:
    """Write labelId PNGs for every image of a split (labels not needed) and pack the server's zip."""
    p = _prepare(options)
    written = predict_split(p.model, p.samples, p.spec, p.device, out_dir, test_size=p.test_size, precision=p.precision,
                            progress=options.progress)
    packed = make_submission_zip(out_dir, zip_path, p.samples) if zip_path is not None else None
    return written, packed
