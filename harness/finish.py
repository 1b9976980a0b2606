"""The one way a run ends, for `bench run` and `bench eval` alike: the MLflow run and the run folder end with the
same status; a finished run logs its headline metric, twins, per-class IoU and images and writes its record; and
`bench sync` replays, later, what a run journalled but MLflow did not get."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

import torch

from harness import paths, visualize
from harness.errors import BenchError
from harness.results import write_record
from harness.run_folder import RUN_STATUS, RunFolder
from harness.spec import Spec
from harness.tracking import JOURNAL_DIR, Journal, Tracker, class_key, source_tags, sync_journal
from harness.train import TrainPlan


def training_params(spec: Spec, plan: TrainPlan, data_root: Path, train_images: int,
                    device: torch.device) -> dict[str, Any]:
    """What ran: the resolved plan (the recipe after the synthetic budget and the command line), the network
    and the data; the full spec goes in as the spec.json artifact."""
    model = {k: v for k, v in spec.flat().items() if k.startswith("model.")}
    return {**asdict(plan), **model, "data.root": str(data_root), "data.train_images": train_images,
            "device": device.type}


def run_tags(spec: Spec, dataset: str, commit: str, kind: str, entry_point: str, **extra: Any) -> dict[str, str]:
    return {"kind": kind, "row": spec.row, "dataset": dataset, "reference": " | ".join(repr(v) for v in spec.reference.miou),
            "reference_source": spec.reference.source, **source_tags(commit, entry_point),
            **{k: str(v) for k, v in extra.items()}}


def end_run(folder: Optional[RunFolder], tracker: Optional[Tracker], status: str) -> Optional[str]:
    """End the MLflow run and the run folder with the same status; returns the tracker's warning, if any."""
    warning = tracker.finish(status) if tracker is not None else None
    if folder is not None:
        folder.end(status)
    return warning


def finish_run(spec: Spec, tracker: Tracker, record: dict[str, Any], folder: Optional[RunFolder], *, headline: float,
               metrics: dict[str, Optional[float]], step: int, per_class: dict[str, Optional[dict[str, float]]],
               panels: list[Path]) -> dict[str, Any]:
    """Log the headline (`miou`, the table's statistic), the reference and the delta, the twins in `metrics`,
    per-class IoU (`val_iou/<class>`), the per-class table and chart, the training curves and the prediction
    panels; write the record; end the MLflow run and the run folder FINISHED."""
    # Rows outside the table may have no reference: then no reference or delta is logged (None is skipped).
    reference = sum(spec.reference.miou) / len(spec.reference.miou) if spec.reference.miou else None
    per_class = {group: values for group, values in per_class.items() if values}
    logged = {"miou": headline, "reference_miou": reference,
              "delta_miou": None if reference is None else headline - reference, **metrics}
    for group, values in per_class.items():
        logged.update({f"{group}/{class_key(name)}": v for name, v in values.items()})
    tracker.log_metrics(logged, step)
    tables = list(per_class.values())
    tracker.log_text(per_class_csv(tables[0], tables[1] if len(tables) > 1 else None), "per_class_iou.csv")
    chart = visualize.per_class_chart(per_class, tracker.artifact_path("plots/per_class_iou.png"),
                                      title=f"{spec.row}: per-class IoU")
    tracker.log_artifact(chart, "plots")
    history = tracker.journal.metric_history()
    if any(key.startswith("train/") for key in history):
        curves = visualize.training_curves(history, tracker.artifact_path("plots/training_curves.png"),
                                           title=f"{spec.row}: training curves")
        tracker.log_artifact(curves, "plots")
    for panel in panels:
        tracker.log_artifact(panel, "panels")
    record = {**record, "mlflow_run_id": tracker.run_id}
    path = write_record(record)
    tracker.set_tag("result_record", str(path))
    end_run(folder, tracker, "FINISHED")
    record["_path"] = str(path)
    return record


def sync_runs(run_dirs: list[Path], tracking_uri: Optional[str] = None) -> list[str]:
    """`bench sync`: replay each run folder's tracking journal into MLflow (default: every run with entries
    MLflow lacks). A run still marked running whose process is gone is ended KILLED in both places first."""
    if not run_dirs:
        run_dirs = [j.parent.parent for j in sorted(paths.runs_dir().glob(f"**/{JOURNAL_DIR}/journal.jsonl"))
                    if Journal(j.parent).pending()]
        if not run_dirs:
            return [f"nothing to sync: every run under {paths.runs_dir()} is in MLflow"]
    lines = []
    for run_dir in run_dirs:
        if not (run_dir / JOURNAL_DIR / "journal.jsonl").is_file():
            raise BenchError(f"{run_dir} has no tracking journal ({JOURNAL_DIR}/journal.jsonl); give a run folder "
                             "written by `bench run` or `bench eval`")
        folder = RunFolder.open(run_dir)
        if folder.info.get("status") == RUN_STATUS["RUNNING"] and folder.status == RUN_STATUS["KILLED"]:
            journal = Journal(run_dir / JOURNAL_DIR)
            journal.append({"op": "status", "status": "KILLED", "time": int(time.time() * 1000)})
            folder.end("KILLED")
            lines.append(f"{run_dir}: its process is gone; marked interrupted (KILLED)")
        run_id, sent = sync_journal(run_dir / JOURNAL_DIR, tracking_uri)
        if run_id and folder.info.get("mlflow_run_id") != run_id:
            folder.update(mlflow_run_id=run_id)
        lines.append(f"{run_dir}: {sent} entries sent to MLflow run {run_id}" if sent
                     else f"{run_dir}: already complete in MLflow run {run_id}")
    return lines


def per_class_csv(per_class: dict[str, float], ema: Optional[dict[str, float]]) -> str:
    lines = ["class,iou" + (",iou_ema" if ema else "")]
    for name, value in per_class.items():
        lines.append(f"{name},{value:.4f}" + (f",{ema[name]:.4f}" if ema else ""))
    return "\n".join(lines) + "\n"
