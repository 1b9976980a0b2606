"""Early warning: each evaluation of a training run against earlier runs of the same row, dataset and budget at
the same iteration (harness.report.behind): the threshold rule on hand-written journals, `bench sweep status`'s
column, and (slow) synthetic runs: a normal run, a sabotaged one (lr / 100) flagged and stopped by
--stop-if-behind, a second normal seed not flagged, and the stopped run resumed."""

from __future__ import annotations

import json
import logging
import statistics
from pathlib import Path

import pytest

from harness.config.spec import load_spec
from harness.engine.run_folder import STOPPED_BEHIND, RunFolder
from harness.engine.train import StoppedBehind
from harness.launch.run import RunOptions, run
from harness.launch.sweep import behind
from harness.paths import runs_dir
from harness.report.behind import EarlyWarning, earlier_runs
from harness.tracking.journal import Journal
from tests.helpers import experiments_with
from tests.test_training_resilience import TINY


def earlier_run(row: str, stamp: str, iters: int, curve: dict[int, float], key: str = "val/miou_ema",
                status: str = "finished") -> Path:
    """A run folder as `bench run` leaves it: run.json and a journal with the planned iterations and a curve."""
    folder = runs_dir() / "synthetic" / row / stamp
    folder.mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps({"status": status, "row": row, "dataset": "synthetic"}))
    journal = Journal(folder / "tracking")
    journal.append({"op": "create", "experiment": "segbench-synthetic", "run_name": row, "tracking_uri": "x",
                    "tags": {}, "time": 0})
    journal.append({"op": "params", "params": {"iters": str(iters)}})
    for step, value in curve.items():
        journal.append({"op": "metrics", "metrics": {key: value, "train/loss": 1.0}, "step": step, "time": 0})
    return folder


@pytest.fixture
def ema_row(tmp_path, monkeypatch):
    monkeypatch.setenv("SEGBENCH_EXPERIMENTS", str(experiments_with(tmp_path, {"tiny": TINY})))
    return load_spec("tiny")  # inherits df_seg_v1-ema: its headline is the EMA weights' curve


def test_one_earlier_run_flags_more_than_two_miou_behind(ema_row):
    earlier_run("tiny", "20260101-000000", 100, {50: 30.0, 100: 40.0})
    earlier_run("tiny", "20260101-000001", 200, {50: 90.0})  # another budget: not a yardstick
    earlier_run("tiny", "20260101-000002", 100, {50: 90.0}, status=STOPPED_BEHIND)  # stopped behind: neither
    earlier_run("tiny", "20260101-000003", 100, {50: 90.0}, key="val/miou")  # the raw curve of an EMA row: no
    warning = EarlyWarning(ema_row, "synthetic", 100, this_run=None)
    assert [r.folder.name for r in warning.earlier] == ["20260101-000000"]  # the others are no yardstick
    within = warning.compare(50, 28.5)  # 1.5 below the only earlier run: within max(2, 3 x 0)
    assert within is not None and within.threshold == 2.0 and not within.flagged
    assert within.behind_miou == pytest.approx(1.5)
    flagged = warning.compare(50, 27.5)
    assert flagged is not None and flagged.flagged and flagged.behind_miou == pytest.approx(2.5)
    assert "2.50 mIoU behind" in flagged.describe()
    assert warning.compare(70, 0.0) is None  # no earlier run evaluated at iteration 70


def test_the_spread_of_several_runs_widens_the_threshold(ema_row):
    values = [30.0, 33.0, 36.0]
    for i, value in enumerate(values):
        earlier_run("tiny", f"20260101-00000{i}", 100, {50: value})
    comparison = EarlyWarning(ema_row, "synthetic", 100, this_run=None).compare(50, 22.0)
    spread = statistics.pstdev(values)  # sqrt(6) = 2.449...: 3 x spread = 7.35 is wider than 2
    assert comparison is not None and comparison.low == 30.0 and comparison.high == 36.0
    assert comparison.threshold == pytest.approx(3 * spread) and comparison.threshold == pytest.approx(7.348, abs=1e-3)
    assert comparison.flagged  # 8 below the lowest
    assert not EarlyWarning(ema_row, "synthetic", 100, this_run=None).compare(50, 23.0).flagged  # 7 below


def test_without_earlier_runs_it_says_so_once(ema_row, caplog):
    caplog.set_level(logging.INFO, logger="harness")
    this = earlier_run("tiny", "20260101-000000", 100, {50: 30.0})  # the run itself is no yardstick
    warning = EarlyWarning(ema_row, "synthetic", 100, this_run=this)
    assert earlier_runs(ema_row, "synthetic", 100, this) == [] and warning.compare(50, 1.0) is None
    assert warning.compare(100, 1.0) is None
    said = [r.message for r in caplog.records if "nothing" in r.message or "no earlier run" in r.message]
    assert len(said) == 1 and "no earlier run of tiny on synthetic with 100 planned iterations" in said[0]


def test_sweep_status_column_reads_run_json(tmp_path):
    folder = RunFolder.create(tmp_path / "runs", row="tiny", dataset="synthetic")
    assert behind(str(folder.path)) == "-" and behind(None) == "-"
    folder.update(behind={"flagged": False, "behind_miou": -1.0, "iteration": 50, "stop": False})
    assert behind(str(folder.path)) == "ok"
    folder.update(behind={"flagged": True, "behind_miou": 3.25, "iteration": 50, "stop": True})
    assert behind(str(folder.path)) == "3.2 at 50, stopped"


SABOTAGED = {**TINY, "synthetic": {**TINY["synthetic"], "lr": 0.0001}}  # the synthetic lr (0.01) / 100
ITERS, EVAL_EVERY = 32, 30  # evaluations at 30 (where a run may stop) and 32 (the final one)
# The tiny row's seeds differ by up to ~3 mIoU after 30 iterations on the synthetic set: a margin above that noise.
MARGIN = 4.0


@pytest.mark.slow
def test_a_sabotaged_run_is_flagged_and_stopped_another_seed_is_not(tmp_path, monkeypatch, synthetic_root,
                                                                    one_thread):
    def train(spec: dict, seed: int, **more) -> dict:
        monkeypatch.setenv("SEGBENCH_EXPERIMENTS", str(experiments_with(tmp_path, {"tiny": spec})))
        return run(RunOptions(row="tiny", synthetic=True, iters=ITERS, eval_every=EVAL_EVERY, seed=seed,
                              progress=False, stop_if_behind=MARGIN, **more))

    first = train(TINY, 0)
    assert first.behind is None  # nothing to compare with

    with pytest.raises(StoppedBehind) as stopped:
        train(SABOTAGED, 0)
    assert stopped.value.iteration == EVAL_EVERY and stopped.value.path is not None and stopped.value.path.is_file()
    folder = RunFolder.open(stopped.value.path.parent.parent)
    assert folder.status == STOPPED_BEHIND
    comparison = folder.info["behind"]
    assert comparison["flagged"] and comparison["stop"] and comparison["behind_miou"] > MARGIN
    assert comparison["iteration"] == EVAL_EVERY and comparison["runs"] == 1
    journal = Journal(folder.path / "tracking")
    assert journal.metric_history()["behind_miou"] == [(EVAL_EVERY, pytest.approx(comparison["behind_miou"], abs=1e-3))]
    tags = {k: v for e in journal.entries() if e["op"] == "tags" for k, v in e["tags"].items()}
    assert tags["behind"].startswith(f"{comparison['behind_miou']:.2f} mIoU behind at iteration {EVAL_EVERY}")
    assert [e["status"] for e in journal.entries() if e["op"] == "status"] == ["KILLED"]

    second = train(TINY, 1)  # compared with the first run only: the stopped one is no yardstick
    assert second.behind is not None and second.behind["runs"] == 1 and not second.behind["flagged"]

    resumed = train(SABOTAGED, 0, resume=str(folder.path))  # continues past the evaluation it stopped at
    assert resumed.iterations == ITERS and RunFolder.open(folder.path).status == "finished"
    assert Path(resumed.checkpoint).parent.parent == folder.path
