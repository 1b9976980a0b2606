"""The seams of the layered layout: one training step for `bench run` and `bench speed`, and a tracker whose
store is a sink (MLflow by default, TensorBoard event files as the second)."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from harness.launch.run import RunOptions, run
from harness.launch.speed import SpeedOptions, speed
from harness.engine import train

pytestmark = pytest.mark.slow


def test_bench_speed_times_the_step_and_optimizer_bench_run_trains_with(monkeypatch, synthetic_root: Path,
                                                                         one_thread):
    steps: list[str] = []
    optimizers: list[str] = []
    original_step, original_optimizer = train.Trainer.train_step, train.make_optimizer

    def counted_step(self, images, labels):
        steps.append(current[0])
        return original_step(self, images, labels)

    def counted_optimizer(*args, **kwargs):
        optimizers.append(current[0])
        return original_optimizer(*args, **kwargs)

    monkeypatch.setattr(train.Trainer, "train_step", counted_step)
    monkeypatch.setattr(train, "make_optimizer", counted_optimizer)
    current = ["run"]
    record = run(RunOptions(row="df_seg_v1", synthetic=True, iters=3, offline_tracking=True, progress=False))
    assert record.iterations == 3
    current[0] = "speed"
    measured = speed(SpeedOptions(row="df_seg_v1", mode="train", device="cpu", batch=2, warmup=0, repeats=1,
                                  steps=2))
    assert measured.modes["train"]["images_per_s"] > 0
    # 3 training steps; 2 timed steps of the project's step and 2 of its plain fp32 twin, each on its own optimizer.
    assert steps == ["run"] * 3 + ["speed"] * 4
    assert optimizers == ["run", "speed", "speed"]


def test_tensorboard_sink_writes_event_files_a_reader_opens(tmp_path: Path, synthetic_root: Path, one_thread):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from harness.report.records import load_records

    logs = tmp_path / "tb"
    record = run(RunOptions(row="df_seg_v1", synthetic=True, iters=4, tracking_uri=f"tensorboard:{logs}",
                            progress=False))
    events = sorted(logs.glob("segbench-synthetic/df_seg_v1/*/events.out.tfevents.*"))
    assert len(events) == 1, sorted(p.relative_to(logs) for p in logs.rglob("*"))
    reader = EventAccumulator(str(events[0].parent), size_guidance={"scalars": 0, "tensors": 0, "images": 0})
    reader.Reload()
    scalars = set(reader.Tags()["scalars"])
    assert {"train/loss", "train/lr", "val/miou_raw", "miou"} <= scalars
    assert reader.Scalars("miou")[-1].value == pytest.approx(record.miou_best, abs=1e-4)
    assert [e.step for e in reader.Scalars("train/loss")][-1] == 4
    assert any(tag.startswith("plots/") for tag in reader.Tags()["images"])
    texts = reader.Tags()["tensors"]
    assert any(tag.startswith("status") for tag in texts) and any(tag.startswith("params") for tag in texts)
    # The record names the run's TensorBoard folder as its tracked run, and the MLflow store got nothing.
    (stored,) = load_records(dataset="synthetic")
    assert stored.tracking_run_id == str(events[0].parent.relative_to(logs))
    store = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert [e.name for e in store.search_experiments()] == ["Default"]
    assert not store.search_runs([e.experiment_id for e in store.search_experiments()])


def test_tensorboard_without_a_folder_is_one_line(synthetic_root: Path):
    from harness.errors import BenchError

    with pytest.raises(BenchError, match="tensorboard:DIR"):
        run(RunOptions(row="df_seg_v1", synthetic=True, iters=1, tracking_uri="tensorboard:", progress=False))


REPORT_ONLY = """
import sys
from harness.cli import main
try:
    main(sys.argv[1:], standalone_mode=False)
except SystemExit as exit:
    assert not exit.code, exit.code
heavy = sorted(name for name in ("torch", "timm", "torchvision", "mlflow") if name in sys.modules)
print("imported:", " ".join(heavy) or "-")
"""


@pytest.mark.parametrize("args", [["table", "--dataset", "synthetic"], ["check", "--rows", "bisenet*"]])
def test_the_report_commands_read_records_without_pytorch_or_mlflow(args, isolated_outputs):
    """`bench table` and `bench check` (run after every finished job of a sweep, and by hand) read records and specs
    only: they start without importing PyTorch, timm or MLflow, which take seconds to load."""
    import subprocess
    import sys

    from harness.paths import PROJECT_ROOT

    done = subprocess.run([sys.executable, "-c", REPORT_ONLY, *args], cwd=PROJECT_ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "imported: -", done.stdout[-2000:]
