"""Evaluation cadence and the reported statistic (UP evaluated every 5 epochs and kept the best), and starting
weights that are loud when missing: the warning, the MLflow tag, the record and the table's mark."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from harness.launch.run import RunOptions, run
from harness.config.spec import load_spec
from harness.engine import checkpoint
from harness.models import build_model
from harness.models.weights import load_init_checkpoint
from harness.paths import default_tracking_uri
from harness.report.records import load_records
from harness.report.table import RANDOM_START_MARK, render
from tests.helpers import experiments_with

pytestmark = pytest.mark.slow


def test_periodic_evaluation_records_final_and_best_raw_and_ema(synthetic_root: Path, one_thread):
    record = run(RunOptions(row="df_seg_v1-ema", synthetic=True, iters=12, eval_every=4, progress=False))
    history = MlflowClient(default_tracking_uri()).get_metric_history(record.tracking_run_id, "val/miou_raw")
    ema_history = MlflowClient(default_tracking_uri()).get_metric_history(record.tracking_run_id, "val/miou_ema")
    assert [m.step for m in history] == [4, 8, 12] and [m.step for m in ema_history] == [4, 8, 12]
    raw = {m.step: m.value for m in history}
    ema = {m.step: m.value for m in ema_history}
    # final = the last evaluation; best = the highest with its iteration, for raw and EMA weights alike
    assert record.miou_final == pytest.approx(raw[12], abs=1e-4)
    assert record.miou_ema == pytest.approx(ema[12], abs=1e-4)
    best_step = max(raw, key=lambda s: (raw[s], -s))
    best_ema_step = max(ema, key=lambda s: (ema[s], -s))
    assert (record.miou_best, record.best_iteration) == (pytest.approx(raw[best_step], abs=1e-4), best_step)
    assert (record.miou_ema_best, record.best_iteration_ema) == (pytest.approx(ema[best_ema_step], abs=1e-4),
                                                                       best_ema_step)
    # the headline is the row's statistic: the best EMA evaluation of this EMA row
    assert record.miou == record.miou_ema_best and record.miou_weights == "ema"
    # best.pt holds the weights of the best EMA evaluation (UP evaluated the EMA model of an EMA row)
    best = checkpoint.load(Path(record.best_checkpoint))
    assert best["iteration"] == best_ema_step
    assert best["best_ema"]["miou"] == pytest.approx(ema[best_ema_step], abs=1e-4)
    assert Path(record.checkpoint).name == "ckpt-00000012.pt"


# df_seg_v1's recipe and starting-weight file at CPU size, for runs on a Cityscapes-layout folder.
SMALL_DF_SEG = {"inherit": "df_seg_v1", "reference": {"miou": [71.8]},
                "columns": {"batch_size": 2, "test_size": [256, 128]},
                "train": {"crop_size": [128, 128], "workers": 0, "eval_every_epochs": 0},
                "loss": {"ohem_min_kept": 2000}}


@pytest.fixture
def small_row(tmp_path, monkeypatch) -> str:
    monkeypatch.setenv("SEGBENCH_EXPERIMENTS", str(experiments_with(tmp_path, {"df-small": SMALL_DF_SEG})))
    return "df-small"


def test_missing_starting_weights_warn_tag_record_and_mark_the_table(synthetic_root: Path, small_row, one_thread, capsys):
    """A run on a Cityscapes-layout folder without the row's ImageNet file: one prominent warning, the MLflow
    tag, the record's field, and the table's mark."""
    record = run(RunOptions(row=small_row, data_root=str(synthetic_root), iters=2, progress=False))
    stderr = capsys.readouterr().err
    assert f"WARNING: row '{small_row}' starts from" in stderr and "df1_imagenet.pth" in stderr
    assert record.starting_weights.startswith("missing") and "df1_imagenet.pth" in record.starting_weights
    tracked = MlflowClient(default_tracking_uri()).get_run(record.tracking_run_id).data
    assert tracked.tags["starting_weights"] == record.starting_weights
    # a Cityscapes run, the reference's own data: the reference and the delta against it are logged
    assert tracked.metrics["reference_miou"] == 71.8
    assert tracked.metrics["delta_miou"] == pytest.approx(record.miou - 71.8, abs=1e-4)
    (stored,) = load_records(dataset="cityscapes")
    table = render("cityscapes", records=[stored])
    measured, elsewhere = table.split("## Runs that do not count")
    assert "not run" in next(l for l in measured.splitlines() if l.startswith(f"| {small_row} "))
    line = next(l for l in elsewhere.splitlines() if small_row in l)
    assert RANDOM_START_MARK.strip() in line


def test_starting_weights_present_are_loaded_and_reported(synthetic_root: Path, small_row, one_thread, tmp_path,
                                                         monkeypatch, capsys):
    """With the file in $SEGBENCH_WEIGHTS (DFNet1 ImageNet weights, the backbone's own names plus a classifier),
    the run loads every backbone tensor and says so; no warning."""
    model = build_model(load_spec("df_seg_v1"))
    state = {**model.backbone.state_dict(), "fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000)}
    (tmp_path / "weights").mkdir()
    torch.save(state, tmp_path / "weights" / "df1_imagenet.pth")
    monkeypatch.setenv("SEGBENCH_WEIGHTS", str(tmp_path / "weights"))
    record = run(RunOptions(row=small_row, data_root=str(synthetic_root), iters=1, progress=False))
    stderr = capsys.readouterr().err
    assert "WARNING" not in stderr
    total = len(model.backbone.state_dict())
    assert f"loaded {total}/{total} tensors" in stderr
    assert record.starting_weights == f"loaded {tmp_path / 'weights' / 'df1_imagenet.pth'}"


def test_mseg_checkpoint_with_194_classes_loads_all_but_the_classifier(tmp_path, capsys):
    model = build_model(load_spec("df_seg_v1-mseg"))
    own = model.state_dict()
    classifier = [name for name, t in own.items() if t.shape[:1] == (19,)]
    assert classifier, "the model has a 19-class classifier"
    torch.manual_seed(1)
    state = {name: (torch.randn(194, *t.shape[1:]) if name in classifier else torch.randn_like(t.float()).to(t.dtype))
             for name, t in own.items()}
    path = tmp_path / "mseg.pth"
    torch.save({"state_dict": state}, path)
    initial = {name: own[name].clone() for name in classifier}
    loaded = load_init_checkpoint(model, path)
    assert loaded == len(own) - len(classifier)
    after = model.state_dict()
    for name in own:
        if name in classifier:
            assert torch.equal(after[name], initial[name]), name  # re-initialised (kept at its initial values)
        else:
            assert torch.equal(after[name], state[name]), name
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"re-initialised for 19 classes (the checkpoint has 194): {', '.join(classifier)}" in line
