"""The one way a run ends, for `bench run` and `bench eval` alike: the tracked run and the run folder end with the
same status; a finished run logs its headline metric, twins, per-class IoU and images and writes its record."""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Optional

from harness.config.benchmark import REFERENCE_DATASET
from harness.config.curves import TRAIN, grouped, per_class_group
from harness.config.plan import TrainPlan
from harness.config.spec import Spec
from harness.data.cityscapes import CLASS_NAMES
from harness.engine.run_folder import RunFolder
from harness.engine.train import TrainResult
from harness.errors import BenchError
from harness.files import atomic_write_text
from harness.outputs import plots
from harness.report import card
from harness.report.records import (
    AnyResult,
    PerClass,
    ResultRecord,
    TrainRecord,
    environment,
    package_versions,
    utc_now,
    write_result_record,
)
from harness.report.verdicts import headline_miou
from harness.tracking.sink import source_tags
from harness.tracking.tracker import Tracker, class_key

log = logging.getLogger(__name__)


def training_params(spec: Spec, plan: TrainPlan, data_root: Path, train_images: int,
                    device_type: str) -> dict[str, Any]:
    """What ran: the resolved plan (the recipe after the synthetic budget and the command line), the network
    and the data; the full spec goes in as the spec.json artifact."""
    model = {k: v for k, v in spec.flat().items() if k.startswith("model.")}
    return {**asdict(plan), **model, "data.root": str(data_root), "data.train_images": train_images,
            "device": device_type}


def run_tags(spec: Spec, dataset: str, commit: str, kind: str, entry_point: str, **extra: Any) -> dict[str, str]:
    # The reference was measured on Cityscapes: a run on other data carries none (no tag, no metric, no Δ).
    reference = {"reference": " | ".join(repr(v) for v in spec.reference.miou),
                 "reference_source": spec.reference.source} if dataset == REFERENCE_DATASET else {}
    return {"kind": kind, "row": spec.row, "dataset": dataset, **reference, **source_tags(commit, entry_point),
            **{k: str(v) for k, v in extra.items()}}


def end_run(folder: Optional[RunFolder], tracker: Optional[Tracker], status: str) -> Optional[str]:
    """End the tracked run and the run folder with the same status; returns the tracker's warning, if any."""
    if folder is not None:  # first: the run folder says how the run ended even if the store takes its time
        folder.end(status)
    return tracker.finish(status) if tracker is not None else None


def finish_run(spec: Spec, tracker: Tracker, record: AnyResult, folder: Optional[RunFolder], *, headline: float,
               metrics: dict[str, Optional[float]], step: int, per_class: dict[str, Optional[PerClass]],
               panels: list[Path]) -> AnyResult:
    """Log the headline (`miou`, the table's statistic), on Cityscapes the reference and the delta, the twins in
    `metrics`, per-class IoU (`val_iou/<class>`), the per-class table and chart, the training curves and the
    prediction panels; write the record; end the MLflow run and the run folder FINISHED."""
    reference = reference_miou(spec, record.dataset)  # None (not logged) off Cityscapes or without a reference
    # an undefined IoU (null in a record read back) is NaN here, as the metrics hold it
    present = {group: {name: math.nan if v is None else v for name, v in values.items()}
               for group, values in per_class.items() if values}
    logged = {"miou": headline, "reference_miou": reference,
              "delta_miou": None if reference is None else headline - reference, **metrics}
    for group, values in present.items():
        logged.update({f"{group}/{class_key(name)}": v for name, v in values.items()})
    tracker.log_metrics(logged, step)
    tables = list(present.values())
    tracker.log_text(per_class_csv(tables[0], tables[1] if len(tables) > 1 else None), "per_class_iou.csv")
    chart = plots.per_class_chart(present, tracker.artifact_path("plots/per_class_iou.png"),
                                  title=f"{spec.row}: per-class IoU")
    tracker.log_artifact(chart, "plots")
    assert tracker.journal is not None
    history = tracker.journal.metric_history()
    if any(key.startswith(grouped(TRAIN, "")) for key in history):
        curves = plots.training_curves(history, tracker.artifact_path("plots/training_curves.png"),
                                       title=f"{spec.row}: training curves")
        tracker.log_artifact(curves, "plots")
    for panel in panels:
        tracker.log_artifact(panel, "panels")
    weights = card.weight_files(spec, record)
    record = write_result_record(replace(
        record, tracking_run_id=tracker.run_id,
        weight_files=[{k: f[k] for k in ("what", "path", "sha256")} for f in weights]))
    tracker.set_tag("result_record", str(record.path))
    try:
        write_cards(spec, record, tracker.journal.artifacts, folder, tracker=tracker, weights=weights)
    except (OSError, BenchError) as exc:  # the run and its record stand; the card can be written again
        log.warning("warning: could not write the reproduction card (%s); write it later with `bench report %s`",
                    exc, folder.path if folder else record.path)
    end_run(folder, tracker, "FINISHED")
    return record


def write_cards(spec: Spec, record: ResultRecord, artifacts: Path, folder: Optional[RunFolder], *,
                tracker: Optional[Tracker] = None, weights: Optional[list[dict[str, Any]]] = None) -> Path:
    """The reproduction card in the run's artifacts (figures beside it; logged when `tracker` is given) and, with
    the figures' paths from there, as report.md in the run folder. Returns the run folder's copy (or the
    artifact's, for a run without a folder)."""
    figures = tuple(name for name in (card.CURVES, card.PER_CLASS_CHART) if (artifacts / name).is_file())
    text = card.reproduction_card(spec, record, figures="", figure_names=figures, weights=weights)
    target = atomic_write_text(artifacts / card.CARD, text)
    if tracker is not None:
        tracker.log_artifact(target)
    if folder is None:
        return target
    prefix = artifacts.relative_to(folder.path).as_posix() + "/" if artifacts.is_relative_to(folder.path) else \
        artifacts.as_posix() + "/"
    local = card.reproduction_card(spec, record, figures=prefix, figure_names=figures, weights=weights)
    path = atomic_write_text(folder.path / card.CARD, local)
    folder.update(record=record.path, report=str(path))
    return path


def reference_miou(spec: Spec, dataset: str) -> Optional[float]:
    """The mean of the row's reference runs where it applies: the table measured Cityscapes, so a run on any other
    data (the synthetic set) has no reference and no delta; a row outside the table may have none at all."""
    if dataset != REFERENCE_DATASET or not spec.reference.miou:
        return None
    return sum(spec.reference.miou) / len(spec.reference.miou)


def per_class_csv(per_class: dict[str, float], ema: Optional[dict[str, float]]) -> str:
    lines = ["class,iou" + (",iou_ema" if ema else "")]
    for name, value in per_class.items():
        lines.append(f"{name},{value:.4f}" + (f",{ema[name]:.4f}" if ema else ""))
    return "\n".join(lines) + "\n"


@dataclass
class TrainingOutcome:
    """What a finished training produced, and what it ran on: everything its record says."""

    spec: Spec
    plan: TrainPlan
    dataset: str
    processes: int
    device_type: str
    result: TrainResult
    wall_time_s: float
    starting_weights: str
    commit: str
    train_images: int
    val_images: int
    behind: Optional[dict[str, Any]] = None  # the newest early-warning comparison (harness.report.behind)
    data_digests: Optional[dict[str, str]] = None  # split -> digest of its files, as in MLflow's dataset inputs


def training_record(outcome: TrainingOutcome) -> TrainRecord:
    """The result record of a training run (before it is written: its tracked run and weight files are added by
    `finish_run`)."""
    result, plan, spec = outcome.result, outcome.plan, outcome.spec
    ema, best, best_ema = result.ema_metrics, result.best, result.best_ema
    assert best is not None
    use_ema = spec.columns.ema and best_ema is not None
    return TrainRecord(
        row=spec.row, dataset=outcome.dataset, seed=plan.seed,
        miou=headline_miou(spec, best.miou, best_ema.miou if best_ema else None, ema.miou if ema else None),
        miou_weights="ema" if use_ema else "raw",
        miou_iteration=best_ema.iteration if use_ema and best_ema else best.iteration,
        miou_final=result.metrics.miou, pixel_accuracy=result.metrics.pixel_accuracy,
        miou_ema=ema.miou if ema else None,
        miou_best=best.miou, best_iteration=best.iteration,
        miou_ema_best=best_ema.miou if best_ema else None,
        best_iteration_ema=best_ema.iteration if best_ema else None,
        best_checkpoint=str(result.best_checkpoint) if result.best_checkpoint else None,
        starting_weights=outcome.starting_weights,
        per_class_iou=dict(zip(CLASS_NAMES, result.metrics.iou)),
        per_class_iou_ema=dict(zip(CLASS_NAMES, ema.iou)) if ema else None,
        iterations=plan.iters, batch_size=plan.batch_size, crop_size=list(plan.crop_size),
        train_images=outcome.train_images, val_images=outcome.val_images, devices=outcome.processes,
        device=outcome.device_type, precision=plan.precision, checkpoint=str(result.checkpoint),
        wall_time_s=round(outcome.wall_time_s, 1), git_commit=outcome.commit, behind=outcome.behind,
        data_digests=outcome.data_digests,
        versions=package_versions(), environment=environment(outcome.device_type), plan=asdict(plan),
        time=utc_now(),
    )


def finish_training(tracker: Tracker, folder: RunFolder, outcome: TrainingOutcome, panels: list[Path]
                    ) -> TrainRecord:
    """The end of a finished training: its record, headline and twins, per-class IoU and images."""
    record = training_record(outcome)
    ema = outcome.result.ema_metrics
    twins = {  # raw and EMA, final and best: the same names in every training run
        "final_miou": record.miou_final, "final_pixel_accuracy": record.pixel_accuracy,
        "final_miou_ema": record.miou_ema, "final_pixel_accuracy_ema": ema.pixel_accuracy if ema else None,
        "best_miou": record.miou_best, "best_iteration": record.best_iteration,
        "best_miou_ema": record.miou_ema_best, "best_iteration_ema": record.best_iteration_ema,
    }
    return finish_run(outcome.spec, tracker, record, folder, headline=record.miou,
                      metrics=twins, step=outcome.plan.iters,
                      per_class={per_class_group("raw"): record.per_class_iou,
                                 per_class_group("ema"): record.per_class_iou_ema},
                      panels=panels)
