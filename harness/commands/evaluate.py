"""`bench eval`: a trained checkpoint scored on a labelled split as the official evaluator scores it, tracked as an
evaluation run and written as a result record of kind "eval"."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from harness import paths
from harness.config.curves import per_class_group, val_curve
from harness.data.cityscapes import CLASS_NAMES
from harness.engine.evaluate import TestMode
from harness.engine.run_folder import RunFolder
from harness.engine.trained import LoadedCheckpoint, load_for_evaluation
from harness.outputs.predictions import evaluate_split
from harness.report.finish import end_run, finish_run, run_tags
from harness.report.records import EvalRecord, PerClass, environment, git_commit, package_versions, utc_now
from harness.tracking.journal import JOURNAL_DIR
from harness.tracking.tracker import Tracker

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


def evaluate_checkpoint(options: EvalOptions) -> EvalRecord:
    """Score a checkpoint on a labelled split, track it as an evaluation run (tag kind=eval, named "eval <row> ..."
    so it is never taken for a training run) and write a result record (kind "eval")."""
    loaded = load_for_evaluation(options.checkpoint, options.row, options.weights, options.synthetic,
                                 options.data_root, options.split, options.device, options.precision,
                                 progress=options.progress)
    spec, plan, dataset = loaded.spec, loaded.plan, loaded.dataset
    mode = TestMode.from_plan(plan)
    tracker = Tracker(options.tracking_uri or paths.default_tracking_uri(), dataset, offline=options.offline_tracking)
    commit = git_commit()
    folder = RunFolder.create(paths.runs_dir() / dataset / spec.row / EVAL_RUNS, kind="eval", row=spec.row,
                              dataset=dataset, tracking_uri=tracker.tracking_uri)
    params = {**{k: v for k, v in spec.flat().items() if k.startswith("model.")},
              "checkpoint": str(loaded.path), "weights": loaded.weights, "split": options.split,
              "test_size": plan.test_size, "test_mode": mode.describe(), "precision": plan.precision,
              "data.root": str(loaded.data_root), "device": loaded.device.type}
    started = time.perf_counter()
    try:
        run_name = f"eval {spec.row} ({loaded.weights} weights, {options.split})"
        tags = run_tags(spec, dataset, commit, "eval", "bench eval", weights=loaded.weights,
                        checkpoint=str(loaded.path))
        run_id = tracker.start(folder.path / JOURNAL_DIR, run_name, params, tags)
        folder.update(tracking_run_id=run_id)
        tracker.log_text(json.dumps(spec.to_dict(), indent=2), "spec.json")
        panels_dir = tracker.artifact_path("panels/.keep").parent
        metrics = evaluate_split(
            loaded.model, loaded.samples, plan, loaded.device,
            save_predictions_dir=Path(options.save_predictions) if options.save_predictions else None,
            panels_dir=panels_dir if options.num_panels else None, num_panels=options.num_panels,
            progress=options.progress, desc=f"eval {loaded.weights}")
        per_class: PerClass = dict(zip(CLASS_NAMES, metrics.iou))
        record = EvalRecord(
            row=spec.row, dataset=dataset, split=options.split, weights=loaded.weights,
            checkpoint=str(loaded.path), miou=metrics.miou, pixel_accuracy=metrics.pixel_accuracy,
            per_class_iou=per_class, test_size=list(plan.test_size), test_mode=mode.describe(),
            device=loaded.device.type, precision=plan.precision,
            wall_time_s=round(time.perf_counter() - started, 1),
            git_commit=commit, versions=package_versions(), environment=environment(loaded.device.type),
            plan=asdict(plan), tracking_run_id=run_id, time=utc_now(),
        )
        return finish_run(spec, tracker, record, folder, headline=metrics.miou,
                          metrics={val_curve("miou", loaded.weights): metrics.miou,  # as training runs name them
                                   val_curve("pixel_accuracy", loaded.weights): metrics.pixel_accuracy},
                          step=0, per_class={per_class_group(loaded.weights): per_class},
                          panels=sorted(panels_dir.glob("*.png")))
    except BaseException:
        end_run(folder, tracker, "FAILED")
        raise


def closing_line(record: EvalRecord) -> str:
    return (f"{record.row} {record.weights} weights on {record.dataset} {record.split}: "
            f"mIoU {record.miou:.2f} ({record.test_mode}); record {record.path}")


__all__ = ["EvalOptions", "LoadedCheckpoint", "closing_line", "evaluate_checkpoint"]
