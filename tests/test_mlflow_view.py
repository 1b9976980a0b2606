"""The MLflow view of a training run and a `bench eval` run: one headline metric (the same number in the record,
MLflow, the closing line and both tables), a reference and delta only on Cityscapes, ungrouped summary metrics, kind
tags, MLflow's own source fields, images; and `bench ui` opening on the newest run's training runs table with the
headline column shown (headless Chromium), its server ended with it on SIGINT, SIGTERM and a failed start."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

import harness.tracking.mlflow_ui as mlflow_ui
from harness.cli import main
from harness.commands.evaluate import EvalOptions, evaluate_checkpoint
from harness.launch.run import RunOptions, closing_line, run
from harness.config.spec import load_spec
from harness.data.cityscapes import CLASS_NAMES, find_samples
from harness.errors import BenchError
from harness.paths import default_tracking_uri
from harness.report.verdicts import measured_miou
from harness.tracking.tracker import metric_value
from tests.helpers import bench, experiments_with
from tests.test_training_resilience import TINY

pytestmark = pytest.mark.slow

TWINS = {"final_miou", "final_miou_ema", "best_miou", "best_miou_ema", "best_iteration", "best_iteration_ema"}


def train_and_eval(tmp_path: Path, monkeypatch, iters: int, eval_every: int = 0) -> tuple[dict, dict]:
    monkeypatch.setenv("SEGBENCH_EXPERIMENTS", str(experiments_with(tmp_path, {"tiny": TINY})))
    record = run(RunOptions(row="tiny", synthetic=True, iters=iters, eval_every=eval_every, progress=False))
    evaluated = evaluate_checkpoint(EvalOptions(row="tiny", checkpoint=record.checkpoint, synthetic=True,
                                                weights="raw", num_panels=2, progress=False))
    return record, evaluated


def test_training_and_eval_runs_line_up(tmp_path, monkeypatch, synthetic_root, one_thread):
    record, evaluated = train_and_eval(tmp_path, monkeypatch, iters=6, eval_every=3)
    client = MlflowClient(default_tracking_uri())
    train, evaluation = client.get_run(record.tracking_run_id), client.get_run(evaluated.tracking_run_id)
    spec = load_spec("tiny")

    # kind tags, names that cannot be confused, the commit in MLflow's own field
    assert train.data.tags["kind"] == "train" and evaluation.data.tags["kind"] == "eval"
    assert train.info.run_name == "tiny" and evaluation.info.run_name.startswith("eval tiny")
    for mlflow_run in (train, evaluation):
        assert mlflow_run.info.status == "FINISHED"
        assert len(mlflow_run.data.tags["mlflow.source.git.commit"]) == 40
        assert "git_commit" not in mlflow_run.data.tags

    # one headline per run (the table's statistic); no reference or delta on synthetic data (they are Cityscapes')
    t = train.data.metrics
    assert record.miou == pytest.approx(measured_miou(spec, record)) == record.miou_ema_best  # an EMA row
    assert t["miou"] == pytest.approx(record.miou, abs=1e-4) and record.miou_weights == "ema"
    assert not {"reference_miou", "delta_miou"} & set(t)
    e = evaluation.data.metrics
    assert e["miou"] == pytest.approx(evaluated.miou, abs=1e-4) and "delta_miou" not in e
    # the same number, as people read it, in the closing line and both tables
    shown = f"{record.miou:.2f}"
    line = closing_line(record)
    assert line.split(": mIoU ")[1].startswith(f"{shown} (EMA, best at {record.miou_iteration}); raw "), line
    synthetic = CliRunner().invoke(main, ["table", "--dataset", "synthetic"]).output
    assert shown in next(row for row in synthetic.splitlines() if row.startswith("| tiny "))
    every = CliRunner().invoke(main, ["table", "--all"]).output
    listed = next(row for row in every.splitlines() if "| tiny " in row and Path(record.path).name in row)
    assert f"| {shown} " in listed and "dataset 'synthetic', not Cityscapes" in listed and "| synthetic " in listed
    # metrics logged at 6 significant digits, not float32 noise
    # (system metrics are MLflow's own monitors' values: disk megabytes run to 7 digits)
    assert all(len(repr(v).replace("-", "").replace(".", "").lstrip("0")) <= 6 for k, v in t.items()
               if not k.startswith("system/")), t

    # twins named alike in both kinds of run: raw weights are val/miou_raw in each (this eval scored raw weights)
    assert TWINS <= set(t) and t["final_miou"] == pytest.approx(record.miou_final, abs=1e-4)
    assert t["best_miou_ema"] == pytest.approx(record.miou_ema_best, abs=1e-4)
    assert e["val/miou_raw"] == pytest.approx(t["final_miou"], abs=1e-4) and "val/miou_ema" not in e
    history = client.get_metric_history(train.info.run_id, "val/miou_ema")
    assert [m.step for m in history] == [3, 6]
    assert {m.step for m in client.get_metric_history(train.info.run_id, "train/loss")} == set(range(1, 7))
    assert {m.step for m in client.get_metric_history(train.info.run_id, "train/lr")} == set(range(1, 7))
    for name in CLASS_NAMES:
        key = name.replace(" ", "_")
        if record.per_class_iou[name] == record.per_class_iou[name]:  # NaN (class absent) is not logged
            assert t[f"val_iou/{key}"] == pytest.approx(record.per_class_iou[name], abs=1e-4)
            assert e[f"val_iou/{key}"] == pytest.approx(record.per_class_iou[name], abs=1e-4)
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
    run_json = json.loads((Path(record.checkpoint).parent.parent / "run.json").read_text())
    assert run_json["status"] == "finished" and run_json["tracking_run_id"] == train.info.run_id


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


def server_group(ui: subprocess.Popen) -> int:
    """The process group of the MLflow server `bench ui` started (its child, leading its own group)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == ui.pid:  # ppid
            return int(fields[2])  # pgrp
    raise AssertionError("bench ui started no server process")


def group_gone(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return True
    return False


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def start_bench_ui(port: int, *args: str) -> tuple[subprocess.Popen, str, int]:
    """`bench ui` in a subprocess, as a user starts it: (process, the URL it printed, its server's group)."""
    ui = bench("ui", "--port", str(port), *args)
    deadline = time.monotonic() + 330
    assert ui.stdout is not None
    for line in ui.stdout:
        if "http://" in line:
            return ui, line.split(": ", 1)[1].strip(), server_group(ui)
        assert time.monotonic() < deadline
    raise AssertionError(ui.communicate())


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the server's processes through Linux's /proc")
def test_bench_ui_opens_on_the_newest_runs_table_with_the_headline_and_ends_on_sigterm(tmp_path, monkeypatch,
                                                                                         synthetic_root, one_thread):
    browser = chromium()
    record, _ = train_and_eval(tmp_path, monkeypatch, iters=2)
    port = free_port()
    ui, url, group = start_bench_ui(port)  # no --dataset: the newest training run's, a synthetic one
    try:
        client = MlflowClient(default_tracking_uri())
        experiment = client.get_experiment_by_name("segbench-synthetic")
        assert url == (f"http://127.0.0.1:{port}/#/experiments/{experiment.experiment_id}/runs"
                       "?viewStateShareKey=segbench-training-runs&workflowType=machine_learning")
        if shutil.which("ss"):  # loopback only (iproute2's ss; where it is absent the URL's host says as much)
            listening = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True).stdout
            local = {line.split()[3] for line in listening.splitlines() if line.strip()}
            assert local == {f"127.0.0.1:{port}"}, listening
        dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                              "--window-size=1600,1000", "--virtual-time-budget=15000", "--dump-dom", url],
                             capture_output=True, text=True, timeout=180).stdout
    finally:
        ui.send_signal(signal.SIGTERM)
        out, err = ui.communicate(timeout=60)
    # MLflow 3's model-training view: its sidebar's Runs and Models, not the GenAI view's Training runs and Judges.
    assert ">Runs<" in dom and ">Models<" in dom and ">Training runs<" not in dom and ">Judges<" not in dom
    # The saved view filtered out the eval run, and its headline column shows the run's value as MLflow holds it.
    assert ">tiny<" in dom and "eval tiny" not in dom, dom[-2000:]
    value = repr(metric_value(record.miou))
    cell = re.search(r'cell-metrics\.`miou`-\d+"[^>]*>(?:<[^>]*>)*\s*([^<\s]+)', dom)
    assert cell is not None and cell.group(1) == value, (value, cell and cell.group(1))
    # SIGTERM ended bench ui and every process of its server, and freed the port.
    assert ui.returncode == 128 + signal.SIGTERM and "Traceback" not in err, err
    assert "stopped the MLflow UI (SIGTERM)" in out
    assert group_gone(group) and port_free(port)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the server's processes through Linux's /proc")
def test_bench_ui_ctrl_c_stops_it_and_its_whole_server_quietly(synthetic_root):
    port = free_port()
    ui, url, group = start_bench_ui(port, "--dataset", "synthetic")
    ui.send_signal(signal.SIGINT)
    out, err = ui.communicate(timeout=60)
    assert ui.returncode == 0 and "stopped the MLflow UI" in out, (out, err)
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert group_gone(group) and port_free(port)


def test_bench_ui_start_up_that_never_answers_ends_its_server_in_one_line(monkeypatch, synthetic_root):
    monkeypatch.setattr(mlflow_ui, "UI_START_TIMEOUT_S", 0.5)
    started: list[mlflow_ui.UiServer] = []
    real = mlflow_ui.UiServer.__init__

    def recording(self, *args, **kwargs):
        real(self, *args, **kwargs)
        started.append(self)

    monkeypatch.setattr(mlflow_ui.UiServer, "__init__", recording)
    port = free_port()
    with pytest.raises(BenchError, match=f"did not answer on 127.0.0.1:{port} within 0 s"):
        mlflow_ui.serve_ui("synthetic", None, "127.0.0.1", port, echo=lambda line: None)
    (server,) = started
    assert group_gone(server.group) and port_free(port) and not server.log.exists()


def test_a_training_run_logs_system_metrics_and_its_dataset(tmp_path, monkeypatch, synthetic_root, one_thread):
    """MLflow's system metrics (CPU and memory at least; sampled every second here) and the train and val splits
    as dataset inputs whose digest is the record's."""
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")
    monkeypatch.setenv("SEGBENCH_EXPERIMENTS", str(experiments_with(tmp_path, {"tiny": TINY})))
    record = run(RunOptions(row="tiny", synthetic=True, iters=2, progress=False))
    client = MlflowClient(default_tracking_uri())
    train = client.get_run(record.tracking_run_id)
    system = {k for k in train.data.metrics if k.startswith("system/")}
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes",
            "system/system_memory_usage_percentage"} <= system, system
    assert 0 < train.data.metrics["system/system_memory_usage_megabytes"]
    inputs = {i.dataset.name: i for i in train.inputs.dataset_inputs}
    assert set(inputs) == {"synthetic-train", "synthetic-val"}
    for split, context in (("train", "training"), ("val", "validation")):
        logged = inputs[f"synthetic-{split}"]
        # The digest from outside the code: SHA-256 of "path<TAB>size" of the split's images and labels, sorted.
        files = sorted(f"{p.relative_to(synthetic_root).as_posix()}\t{p.stat().st_size}"
                       for sample in find_samples(synthetic_root, split) for p in (sample.image, sample.label))
        expected = hashlib.sha256("\n".join(files).encode()).hexdigest()[:32]
        assert logged.dataset.digest == record.data_digests[split] == expected
        assert json.loads(logged.dataset.profile) == {"split": split,
                                                      "num_images": getattr(record, f"{split}_images")}
        assert {t.key: t.value for t in logged.tags}["mlflow.data.context"] == context
