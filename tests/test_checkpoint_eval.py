"""`bench eval` and `bench predict` on checkpoints of a real (synthetic) training run."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient
from PIL import Image

from harness.cli import main
from harness.config.spec import load_spec
from harness.data.cityscapes import find_samples
from harness.data.labels import TRAIN_ID_TO_LABEL_ID
from harness.launch.run import RunOptions, run
from harness.outputs.predictions import score_predictions
from harness.paths import default_tracking_uri
from harness.report.records import EvalRecord, load_records
from harness.report.table import table_frame
from tests.helpers import experiments_with
from tests.test_training_resilience import TINY

pytestmark = pytest.mark.slow


@pytest.fixture
def trained(tmp_path, monkeypatch, synthetic_root):
    monkeypatch.setenv("SEGBENCH_EXPERIMENTS", str(experiments_with(tmp_path, {"tiny": TINY})))
    return run(RunOptions(row="tiny", synthetic=True, iters=16, progress=False))


def bench(*args: str):
    return CliRunner().invoke(main, list(args))


def test_eval_reproduces_the_training_runs_miou_for_both_weight_sets(trained, tmp_path, synthetic_root):
    predictions = tmp_path / "predictions"
    raw = bench("eval", "--row", "tiny", "--checkpoint", trained.checkpoint, "--synthetic", "--weights", "raw",
                "--save-predictions", str(predictions))
    assert raw.exit_code == 0, raw.output
    # Without --row, the checkpoint says which row it trained.
    ema = bench("eval", "--checkpoint", trained.checkpoint, "--synthetic", "--weights", "ema")
    assert ema.exit_code == 0, ema.output
    evals = {r.weights: r for r in load_records(dataset="synthetic") if isinstance(r, EvalRecord)}
    assert evals["ema"].row == "tiny"
    assert evals["raw"].miou == pytest.approx(trained.miou_final, abs=1e-9)
    assert evals["ema"].miou == pytest.approx(trained.miou_ema, abs=1e-9)
    assert evals["raw"].miou != evals["ema"].miou  # 16 steps: the EMA lags the raw weights visibly

    # The saved labelId PNGs score the same through the official-style reader.
    val = find_samples(synthetic_root, "val")
    assert len(list(predictions.rglob("*.png"))) == len(val)
    assert score_predictions(val, predictions).miou == pytest.approx(evals["raw"].miou, abs=1e-9)

    client = MlflowClient(default_tracking_uri())
    eval_run = client.get_run(evals["raw"].tracking_run_id)
    assert eval_run.data.tags["kind"] == "eval" and eval_run.info.status == "FINISHED"
    assert eval_run.data.metrics["val/miou_raw"] == pytest.approx(evals["raw"].miou, abs=1e-4)
    panels = client.list_artifacts(eval_run.info.run_id, "panels")
    assert len(panels) == 4 and all(a.path.endswith(".png") for a in panels)
    assert {"per_class_iou.csv", "report.md"} <= {a.path for a in client.list_artifacts(eval_run.info.run_id)}
    # Each evaluation's reproduction card: why it does not count, and the checksum of the checkpoint it scored.
    cards = sorted((tmp_path / "runs" / "synthetic" / "tiny" / "eval").glob("*/report.md"))
    digest = hashlib.sha256(Path(trained.checkpoint).read_bytes()).hexdigest()
    assert len(cards) == 2
    for card in map(Path.read_text, cards):
        assert "**Does not count** (evaluation): an evaluation of a checkpoint" in card and digest in card

    # Evaluations of a run's own checkpoint do not count again in the table.
    frame = table_frame([load_spec("tiny")], load_records(dataset="synthetic"))
    assert frame["measured mIoU (runs)"].tolist() == [f"{trained.miou_ema:.2f}"]


def test_predict_writes_label_ids_and_the_server_zip(trained, tmp_path, synthetic_root):
    out = tmp_path / "submission"
    result = bench("predict", "--row", "tiny", "--checkpoint", trained.checkpoint, "--synthetic",
                   "--split", "val", "--out", str(out))
    assert result.exit_code == 0, result.output
    val = find_samples(synthetic_root, "val")
    with zipfile.ZipFile(out.with_suffix(".zip")) as archive:
        names = sorted(archive.namelist())
    assert names == sorted(f"{s.city}/{s.image.name}" for s in val)
    prediction = np.asarray(Image.open(out / val[0].city / val[0].image.name))
    assert prediction.shape == np.asarray(Image.open(val[0].label)).shape
    assert set(np.unique(prediction)) <= set(TRAIN_ID_TO_LABEL_ID)


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_bad_checkpoint_is_one_line_naming_the_path(trained, tmp_path, damage):
    path = tmp_path / "broken.pt"
    if damage == "truncated":
        data = Path(trained.checkpoint).read_bytes()
        path.write_bytes(data[: len(data) // 3])
    result = bench("eval", "--row", "tiny", "--checkpoint", str(path), "--synthetic")
    assert result.exit_code != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0]


def test_raw_row_checkpoint_has_no_ema_weights(tmp_path, monkeypatch, synthetic_root):
    monkeypatch.setenv("SEGBENCH_EXPERIMENTS", str(experiments_with(
        tmp_path, {"tiny-raw": {**TINY, "columns": {"ema": False}}})))
    record = run(RunOptions(row="tiny-raw", synthetic=True, iters=1, progress=False))
    result = bench("eval", "--row", "tiny-raw", "--checkpoint", record.checkpoint, "--synthetic", "--weights", "ema")
    assert result.exit_code != 0 and "has no EMA weights" in result.stderr
