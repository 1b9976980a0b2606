"""Tracking backends by registration: MLflow (the default), TensorBoard (`tensorboard:DIR`) and a third one added
by the tests alone (tests/jsonl_backend.py, `jsonl:DIR`, one module plus its registration) each take a run live and
a run replayed by `bench sync` from its journal, and answer `bench doctor`'s store check; nothing above
harness/tracking names a backend."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from harness.report.readiness import GO, NO_GO, DoctorOptions, check_tracking
from harness.tracking import backends
from harness.tracking.tracker import Tracker, sync_journal
from tests import jsonl_backend

PARAMS = {"lr": 0.01, "batch": 8}
METRICS = {"val_miou": 54.5, "train_loss": 1.25}  # logged at step 3 as val/miou and train/loss
STEP = 3


@pytest.fixture
def jsonl_registered() -> Iterator[None]:
    backends.register(jsonl_backend.SCHEME, "tests.jsonl_backend")
    yield
    backends.unregister(jsonl_backend.SCHEME)


def mlflow_run(uri: str, run_id: str) -> dict[str, Any]:
    from mlflow.tracking import MlflowClient

    run = MlflowClient(uri).get_run(run_id)
    history = MlflowClient(uri).get_metric_history(run_id, "val/miou")
    return {"status": run.info.status, "params": run.data.params, "val/miou": [(m.step, m.value) for m in history],
            "train/loss": run.data.metrics["train/loss"]}


def tensorboard_run(uri: str, run_id: str) -> dict[str, Any]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    reader = EventAccumulator(str(Path(uri.removeprefix("tensorboard:")) / run_id),
                              size_guidance={"scalars": 0, "tensors": 0})
    reader.Reload()
    status = reader.Tensors("status/text_summary")[-1].tensor_proto.string_val[0].decode()
    params = reader.Tensors("params/text_summary")[-1].tensor_proto.string_val[0].decode()
    table = dict(re.findall(r"\| (\w+) \| ([^|]+?) \|", params))
    table.pop("key")  # the table's header
    return {"status": status, "params": table,
            "val/miou": [(e.step, e.value) for e in reader.Scalars("val/miou")],
            "train/loss": reader.Scalars("train/loss")[-1].value}


def jsonl_run(uri: str, run_id: str) -> dict[str, Any]:
    entries = jsonl_backend.runs(uri)[run_id]
    metrics = [e for e in entries if e["op"] == "metrics"]
    return {"status": [e for e in entries if e["op"] == "status"][-1]["status"],
            "params": next(e for e in entries if e["op"] == "params")["params"],
            "val/miou": [(e["step"], e["metrics"]["val/miou"]) for e in metrics],
            "train/loss": metrics[-1]["metrics"]["train/loss"]}


BACKENDS: dict[str, tuple[Callable[[Path], str], Callable[[str, str], dict[str, Any]]]] = {
    "mlflow": (lambda tmp: f"sqlite:///{tmp / 'mlflow.db'}", mlflow_run),
    "tensorboard": (lambda tmp: f"tensorboard:{tmp / 'tb'}", tensorboard_run),
    "jsonl": (lambda tmp: f"jsonl:{tmp / 'jsonl'}", jsonl_run),
}


def track(uri: str, journal_dir: Path, offline: bool = False) -> tuple[Tracker, Any]:
    tracker = Tracker(uri, "synthetic", offline=offline)
    run_id = tracker.start(journal_dir, "df_seg_v1", PARAMS, {"row": "df_seg_v1"})
    tracker.log_metrics(METRICS, STEP)
    tracker.log_text("a note\n", "notes.txt")
    return tracker, run_id


def expected(stored: dict[str, Any]) -> None:
    assert stored["status"] == "FINISHED"
    assert stored["params"] == {"lr": "0.01", "batch": "8"}
    assert stored["val/miou"] == [(STEP, pytest.approx(54.5))]
    assert stored["train/loss"] == pytest.approx(1.25)


@pytest.mark.parametrize("name", list(BACKENDS))
def test_each_backend_takes_a_run_live_and_replayed_by_sync(name, isolated_outputs, jsonl_registered):
    if name == "tensorboard":
        pytest.importorskip("tensorboard", reason="the tensorboard package (segbench[dev]) is not installed")
    make_uri, read = BACKENDS[name]
    uri = make_uri(isolated_outputs)

    live, run_id = track(uri, isolated_outputs / "live" / "tracking")
    assert live.finish("FINISHED") is None, "the store did not receive everything"
    assert run_id
    expected(read(uri, run_id))

    offline, none = track(uri, isolated_outputs / "offline" / "tracking", offline=True)
    offline.finish("FINISHED")
    assert none is None
    synced, sent = sync_journal(isolated_outputs / "offline" / "tracking", uri)
    assert synced and synced != run_id and sent == 5  # create, params, metrics, artifact, status
    expected(read(uri, synced))


def test_doctor_asks_the_registered_backend_about_its_store(tmp_path, jsonl_registered):
    good = check_tracking(DoctorOptions(row="df_seg_v1", tracking_uri=f"jsonl:{tmp_path / 'store'}"))
    assert good.verdict == GO and "JSON lines" in good.detail
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    bad = check_tracking(DoctorOptions(row="df_seg_v1", tracking_uri=f"jsonl:{locked / 'store'}"))
    assert bad.verdict == NO_GO and str(locked) in bad.detail or locked.stat().st_uid == 0 and bad.verdict == GO


def test_an_unregistered_scheme_goes_to_mlflow_and_a_registered_one_to_its_module(jsonl_registered):
    assert backends.backend_module("sqlite:///x.db").__name__ == backends.DEFAULT
    assert backends.backend_module("tensorboard:tb").__name__ == "harness.tracking.tensorboard_sink"
    assert backends.backend_module("jsonl:runs") is jsonl_backend
    backends.unregister(jsonl_backend.SCHEME)
    assert backends.backend_module("jsonl:runs").__name__ == backends.DEFAULT


def test_no_module_above_tracking_names_a_backend():
    root = Path(__file__).parent.parent / "harness"
    named = [str(path.relative_to(root)) for path in root.rglob("*.py") if path.parts[-2] != "tracking"
             and re.search(r"tensorboard_sink|mlflow_sink|TensorBoardSink|MlflowSink", path.read_text())]
    assert named == []
