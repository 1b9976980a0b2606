"""End to end on synthetic Cityscapes: training learns, MLflow holds the run, results/ and the table show it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from harness.cli import main
from harness.launch.run import RunOptions, run
from harness.config.spec import load_spec
from harness.data.cityscapes import find_samples
from harness.engine.device import seed_everything
from harness.models import build_model
from harness.outputs.predictions import evaluate_split
from harness.paths import benchmark_path, default_tracking_uri
from harness.report.records import load_records
from harness.tracking.tracker import experiment_name
from tests.helpers import plan_at

pytestmark = pytest.mark.slow


def initial_miou(row: str, root: Path) -> float:
    spec = load_spec(row)
    seed_everything(0)
    return evaluate_split(build_model(spec), find_samples(root, "val"), plan_at(spec, spec.synthetic.test_size),
                          torch.device("cpu"), workers=0, progress=False).miou


def test_short_training_learns_and_is_tracked(synthetic_root: Path):
    before = initial_miou("df_seg_v2", synthetic_root)
    record = run(RunOptions(row="df_seg_v2", synthetic=True, iters=40, progress=False))
    assert record.miou > before + 10, (before, record.miou)
    assert record.miou_ema is None

    client = MlflowClient(default_tracking_uri())
    experiment = client.get_experiment_by_name(experiment_name("synthetic"))
    (mlflow_run,) = client.search_runs([experiment.experiment_id])
    assert mlflow_run.info.run_id == record.tracking_run_id and mlflow_run.info.status == "FINISHED"
    assert mlflow_run.info.run_name == "df_seg_v2"
    assert mlflow_run.data.params["lr"] == "0.01" and mlflow_run.data.params["iters"] == "40"
    assert mlflow_run.data.tags["row"] == "df_seg_v2" and "reference" not in mlflow_run.data.tags
    assert mlflow_run.data.tags["dataset"] == "synthetic" and mlflow_run.data.tags["mlflow.source.git.commit"]
    # the last evaluation is the final raw figure; the headline `miou` is the best (here the same evaluation)
    assert mlflow_run.data.metrics["val/miou_raw"] == pytest.approx(record.miou_final, abs=1e-4)
    assert mlflow_run.data.metrics["miou"] == pytest.approx(record.miou, abs=1e-4)
    assert "reference_miou" not in mlflow_run.data.metrics and "delta_miou" not in mlflow_run.data.metrics
    assert len(client.get_metric_history(mlflow_run.info.run_id, "train/loss")) >= 2
    artifacts = {a.path for a in client.list_artifacts(mlflow_run.info.run_id)}
    assert {"spec.json", "per_class_iou.csv"} <= artifacts

    (stored,) = load_records(dataset="synthetic")
    assert stored.row == "df_seg_v2" and stored.iterations == 40 and len(stored.per_class_iou) == 19
    written = json.loads(Path(str(stored.path)).read_text())
    assert set(written) >= {"seed", "batch_size", "devices", "wall_time_s", "git_commit", "versions", "time"}

    synthetic_table = CliRunner().invoke(main, ["table", "--dataset", "synthetic"]).output
    line = next(l for l in synthetic_table.splitlines() if l.startswith("| df_seg_v2 "))
    assert f"{record.miou:.2f}" in line

    # benchmark.md counts Cityscapes only: a synthetic run leaves it alone; regenerating it shows the row not run,
    # and again without new results changes no byte.
    assert not benchmark_path().exists()
    assert CliRunner().invoke(main, ["table"]).exit_code == 0
    text = benchmark_path().read_text()
    cityscapes_line = next(l for l in text.splitlines() if l.startswith("| df_seg_v2 "))
    assert "not run" in cityscapes_line and f"{record.miou:.2f}" not in text
    assert CliRunner().invoke(main, ["table"]).exit_code == 0
    assert benchmark_path().read_text() == text


def test_ema_row_evaluates_both_weight_sets(synthetic_root: Path):
    record = run(RunOptions(row="df_seg_v2-ema", synthetic=True, iters=4, progress=False))
    assert record.miou_ema is not None and record.per_class_iou_ema is not None
    client = MlflowClient(default_tracking_uri())
    metrics = client.get_run(record.tracking_run_id).data.metrics
    assert "val/miou_raw" in metrics and "val/miou_ema" in metrics and "val/miou" not in metrics


def test_failed_run_is_marked_failed_and_writes_no_record(synthetic_root: Path, monkeypatch):
    from harness.engine.train import Trainer

    def broken_fit(*args, **kwargs):
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(Trainer, "fit", broken_fit)
    with pytest.raises(RuntimeError):
        run(RunOptions(row="df_seg_v2", synthetic=True, iters=2, progress=False))
    client = MlflowClient(default_tracking_uri())
    experiment = client.get_experiment_by_name(experiment_name("synthetic"))
    (failed,) = client.search_runs([experiment.experiment_id])
    assert failed.info.status == "FAILED"
    assert load_records() == []
