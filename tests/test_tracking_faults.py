"""Tracking never stops training: an unreachable store fails in seconds with one line, `--offline-tracking`
trains and `bench sync` logs the run later, and a real `mlflow server` killed mid-run leaves the training
running to its end, its checkpoint and record written, and `bench sync` completing the MLflow run."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from harness.cli import main
from harness.launch.run import RunOptions, run
from harness.paths import runs_dir
from harness.report.records import load_records
from harness.tracking.journal import Journal
from tests.helpers import bench, experiments_with
from tests.test_training_resilience import TINY

pytestmark = pytest.mark.slow


@pytest.fixture
def tiny_row(tmp_path, monkeypatch, synthetic_root):
    monkeypatch.setenv("SEGBENCH_EXPERIMENTS", str(experiments_with(tmp_path, {"tiny": TINY})))
    return "tiny"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def journal_steps(run_dir: Path, key: str) -> set[int]:
    return {step for step, _ in Journal(run_dir / "tracking").metric_history()[key]}


def test_unreachable_store_fails_in_seconds_with_one_line(tiny_row):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    result = CliRunner().invoke(main, ["run", "--row", tiny_row, "--synthetic", "--iters", "2", "--tracking-uri", uri])
    elapsed = time.monotonic() - started
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    (line,) = [l for l in result.stderr.splitlines() if l.startswith("error:")]
    assert line.startswith(f"error: cannot reach MLflow tracking URI '{uri}'") and "--offline-tracking" in line
    assert elapsed < 30, elapsed  # data and model set-up included; MLflow's defaults retried for minutes
    assert not runs_dir().exists() or not any(runs_dir().rglob("run.json"))


def test_offline_run_is_synced_later(tiny_row, tmp_path, one_thread):
    uri = f"sqlite:///{tmp_path / 'later.db'}"
    record = run(RunOptions(row=tiny_row, synthetic=True, iters=4, tracking_uri=uri, offline_tracking=True,
                            progress=False))
    assert record.tracking_run_id is None and Path(record.checkpoint).is_file()
    run_dir = Path(record.checkpoint).parent.parent
    assert json.loads((run_dir / "run.json").read_text())["status"] == "finished"
    assert not (tmp_path / "later.db").exists()  # offline: the store was never touched

    synced = CliRunner().invoke(main, ["sync", str(run_dir)])
    assert synced.exit_code == 0, synced.output
    run_id = json.loads((run_dir / "run.json").read_text())["tracking_run_id"]
    client = MlflowClient(uri)
    mlflow_run = client.get_run(run_id)
    assert mlflow_run.info.status == "FINISHED" and mlflow_run.data.tags["kind"] == "train"
    assert {m.step for m in client.get_metric_history(run_id, "train/loss")} == set(range(1, 5))
    assert mlflow_run.data.metrics["miou"] == pytest.approx(record.miou_ema_best, abs=1e-4)
    assert {a.path for a in client.list_artifacts(run_id, "plots")} >= {"plots/training_curves.png"}
    # journalled like the rest: the dataset inputs and the system metrics arrive with the sync
    inputs = {i.dataset.name: i.dataset.digest for i in mlflow_run.inputs.dataset_inputs}
    assert inputs == {f"synthetic-{split}": record.data_digests[split] for split in ("train", "val")}
    assert "system/cpu_utilization_percentage" in mlflow_run.data.metrics
    again = CliRunner().invoke(main, ["sync", str(run_dir)])  # nothing left: sends nothing twice
    assert again.exit_code == 0 and "already complete" in again.output


def start_server(db: Path, artifacts: Path, port: int) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{db}", "--default-artifact-root", artifacts.as_uri()],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert process.poll() is None, "mlflow server exited"
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=1).ok:
                return process
        except requests.RequestException:
            time.sleep(0.3)
    os.killpg(process.pid, signal.SIGKILL)
    pytest.fail("mlflow server did not start within 120 s")


def kill_server(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGKILL)  # the server and its uvicorn worker, as a crash would
    process.wait(30)


def test_server_killed_mid_run_training_finishes_and_sync_completes_it(tiny_row, tmp_path):
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    db, artifacts = tmp_path / "server.db", tmp_path / "server-artifacts"
    server = start_server(db, artifacts, port)
    try:
        training = bench("run", "--row", tiny_row, "--synthetic", "--iters", "30", "--tracking-uri", uri,
                         env={"OMP_NUM_THREADS": "1"})
        # Kill the server once training is under way and MLflow has received some of its metrics.
        deadline = time.monotonic() + 300
        sent = []
        while time.monotonic() < deadline and training.poll() is None:
            sent = list(runs_dir().glob("synthetic/tiny/*/tracking/sent.jsonl"))
            if sent and len(sent[0].read_text().splitlines()) >= 4:
                break
            time.sleep(0.05)
        assert sent and training.poll() is None, training.communicate()[1] if training.poll() is not None else "timeout"
        kill_server(server)
        out, err = training.communicate(timeout=300)
    finally:
        if server.poll() is None:
            kill_server(server)

    # Training went on to the end: exit 0, the last checkpoint and the record, one warning naming what is missing.
    assert training.returncode == 0, err
    assert "Traceback" not in err
    assert "warning: not logged to MLflow" in err and "bench sync" in err, err
    (record,) = load_records(dataset="synthetic")
    assert record.iterations == 30 and Path(record.checkpoint).name == "ckpt-00000030.pt"
    run_dir = Path(record.checkpoint).parent.parent
    assert json.loads((run_dir / "run.json").read_text())["status"] == "finished"

    server = start_server(db, artifacts, port)
    try:
        client = MlflowClient(uri)
        run_id = record.tracking_run_id
        assert client.get_run(run_id).info.status == "RUNNING"  # what MLflow knew when its server died
        synced = CliRunner().invoke(main, ["sync", str(run_dir)])
        assert synced.exit_code == 0, synced.output
        mlflow_run = client.get_run(run_id)
        assert mlflow_run.info.status == "FINISHED"
        for key in ("train/loss", "train/lr", "val/miou_raw", "val/miou_ema"):
            logged = {m.step for m in client.get_metric_history(run_id, key)}
            assert logged == journal_steps(run_dir, key), key
        assert {m.step for m in client.get_metric_history(run_id, "train/loss")} == set(range(1, 31))
        assert mlflow_run.data.metrics["miou"] == pytest.approx(record.miou_ema_best, abs=1e-4)
        assert mlflow_run.data.tags["result_record"] == record.path
        assert {a.path for a in client.list_artifacts(run_id, "plots")} >= {"plots/training_curves.png"}
    finally:
        kill_server(server)
