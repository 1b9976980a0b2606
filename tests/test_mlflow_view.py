"""The MLflow view of a training run and a `bench eval` run: one headline metric, numeric reference and delta,
twin metrics under grouped names, kind tags, MLflow's own source fields, images; and `bench ui` opening on
the training runs table in headless Chromium."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from harness.commands.evaluate import EvalOptions, evaluate_checkpoint
from harness.commands.run import RunOptions, run
from harness.config.spec import load_spec
from harness.data.cityscapes import CLASS_NAMES
from harness.paths import default_tracking_uri
from harness.report.verdicts import measured_miou
from harness.tracking.mlflow_ui import start_ui
from tests.helpers import experiments_with
from tests.test_training_resilience import TINY

pytestmark = pytest.mark.slow

TWINS = {"final/miou", "final/miou_ema", "best/miou", "best/miou_ema", "best/iteration", "best/iteration_ema"}


def train_and_eval(tmp_path: Path, monkeypatch, iters: int, eval_every: int = 0) -> tuple[dict, dict]:
    monkeypatch.setenv("SEGBENCH_EXPERIMENTS", str(experiments_with(tmp_path, {"tiny": TINY})))
    record = run(RunOptions(row="tiny", synthetic=True, iters=iters, eval_every=eval_every, progress=False))
    evaluated = evaluate_checkpoint(EvalOptions(row="tiny", checkpoint=record["checkpoint"], synthetic=True,
                                                weights="raw", num_panels=2, progress=False))
    return record, evaluated


def test_training_and_eval_runs_line_up(tmp_path, monkeypatch, synthetic_root, one_thread):
    record, evaluated = train_and_eval(tmp_path, monkeypatch, iters=6, eval_every=3)
    client = MlflowClient(default_tracking_uri())
    train, evaluation = client.get_run(record["mlflow_run_id"]), client.get_run(evaluated["mlflow_run_id"])
    spec = load_spec("tiny")

    # kind tags, names that cannot be confused, the commit in MLflow's own field
    assert train.data.tags["kind"] == "train" and evaluation.data.tags["kind"] == "eval"
    assert train.info.run_name == "tiny" and evaluation.info.run_name.startswith("eval tiny")
    for mlflow_run in (train, evaluation):
        assert mlflow_run.info.status == "FINISHED"
        assert len(mlflow_run.data.tags["mlflow.source.git.commit"]) == 40
        assert "git_commit" not in mlflow_run.data.tags

    # one headline per run (the table's statistic), a numeric reference and the delta against it
    t = train.data.metrics
    assert t["miou"] == pytest.approx(measured_miou(spec, record))
    assert t["miou"] == pytest.approx(record["miou_ema_best"])  # an EMA row: the best EMA evaluation
    assert t["reference_miou"] == 1.0 and t["delta_miou"] == pytest.approx(t["miou"] - 1.0)
    e = evaluation.data.metrics
    assert e["miou"] == pytest.approx(evaluated["miou"]) and e["delta_miou"] == pytest.approx(e["miou"] - 1.0)

    # twins named alike in both kinds of run: raw weights are val/miou in each (this eval scored raw weights)
    assert TWINS <= set(t) and t["final/miou"] == pytest.approx(record["miou"])
    assert t["best/miou_ema"] == pytest.approx(record["miou_ema_best"])
    assert e["val/miou"] == pytest.approx(t["final/miou"]) and "val/miou_ema" not in e
    history = client.get_metric_history(train.info.run_id, "val/miou_ema")
    assert [m.step for m in history] == [3, 6]
    assert {m.step for m in client.get_metric_history(train.info.run_id, "train/loss")} == set(range(1, 7))
    assert {m.step for m in client.get_metric_history(train.info.run_id, "train/lr")} == set(range(1, 7))
    for name in CLASS_NAMES:
        key = name.replace(" ", "_")
        if record["per_class_iou"][name] == record["per_class_iou"][name]:  # NaN (class absent) is not logged
            assert t[f"val_iou/{key}"] == pytest.approx(record["per_class_iou"][name])
            assert e[f"val_iou/{key}"] == pytest.approx(record["per_class_iou"][name])
    assert not any(k.startswith(("val_miou", "train_", "iou_")) or k == "lr" for k in {**t, **e})

    # params: what ran (the resolved plan), not the spec's recipe blocks again
    params = train.data.params
    assert params["iters"] == "6" and params["eval_every"] == "3" and params["model.family"] == spec.model.family
    assert not any(k.startswith(("train.", "synthetic.", "plan.", "columns.")) for k in params)

    # images in both kinds of run
    def artifacts(run_id: str, folder: str) -> set[str]:
        return {a.path for a in client.list_artifacts(run_id, folder)}

    assert {"plots/per_class_iou.png", "plots/training_curves.png"} <= artifacts(train.info.run_id, "plots")
    assert len(artifacts(train.info.run_id, "panels")) == 4
    assert artifacts(evaluation.info.run_id, "plots") == {"plots/per_class_iou.png"}
    assert len(artifacts(evaluation.info.run_id, "panels")) == 2

    # the run folder and MLflow agree on how each run ended
    run_json = json.loads((Path(record["checkpoint"]).parent.parent / "run.json").read_text())
    assert run_json["status"] == "finished" and run_json["mlflow_run_id"] == train.info.run_id


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def chromium() -> str:
    found = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("headless Chromium is missing; .ci/run installs it (apt-get install -y chromium)")
        pytest.skip("no chromium on this machine (CI installs it: apt-get install -y chromium)")
    return found


def test_bench_ui_opens_on_the_training_runs_table(tmp_path, monkeypatch, synthetic_root, one_thread):
    browser = chromium()
    train_and_eval(tmp_path, monkeypatch, iters=2)
    port = free_port()
    process, url = start_ui("synthetic", None, "127.0.0.1", port, workers=1)
    try:
        assert url.startswith(f"http://127.0.0.1:{port}/#/experiments/") and "/runs?" in url
        if shutil.which("ss"):  # loopback only (iproute2's ss; where it is absent the URL's host says as much)
            listening = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True).stdout
            local = {line.split()[3] for line in listening.splitlines() if line.strip()}
            assert local == {f"127.0.0.1:{port}"}, listening
        dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                              "--virtual-time-budget=10000", "--dump-dom", url],
                             capture_output=True, text=True, timeout=180).stdout
    finally:
        process.terminate()
        process.wait(30)
    # The runs table lists the training run by name; the eval run is filtered out by the URL's kind filter.
    assert ">tiny<" in dom, dom[-2000:]
    assert "eval tiny" not in dom
