"""The first hour of a new user, second pass (issue 33): each output true for the run it describes, answers in a
second, progress on any terminal, and the smaller edges; each case asserts its one line, its exit code and that
nothing that stood before changed."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from harness.cli import main
from harness.config.spec import load_spec
from harness.data.cityscapes import CLASS_NAMES
from harness.engine.run_folder import RUN_FILE, resolve_latest
from harness.engine.train import TrainLog
from harness.errors import BenchError
from harness.logs import MIN_BAR_COLUMNS, bar_fits
from harness.outputs.predictions import predictions_dir
from harness.paths import PROJECT_ROOT
from harness.report.card import reproduction_card
from harness.report.finish import run_tags
from harness.report.readiness import DoctorOptions, check_dataset
from harness.report.records import PerClass, TrainRecord
from harness.report.table import PROSE_WIDTH
from harness.tracking.mlflow_sink import server_environment
from tests.helpers import experiments_with
from tests.table_fixtures import full_budget_record

BENCH = [sys.executable, "-m", "harness.cli"]


# --- answers within a second: option handling before PyTorch ---------------------------------------------------


@pytest.mark.parametrize("args, fragment", [
    (["run", "--row", "no-such-row"], "unknown row 'no-such-row'"),
    (["run", "--row", "sf_seg_v2", "--data-root", "/missing"], "Cityscapes root /missing does not exist"),
])
def test_a_misspelt_row_or_a_missing_folder_is_answered_before_pytorch_loads(args, fragment, tmp_path):
    before = sorted(tmp_path.rglob("*"))
    started = time.perf_counter()
    result = subprocess.run([*BENCH, *args], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    elapsed = time.perf_counter() - started
    assert result.returncode == 2 and result.stdout == "", result
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and fragment in result.stderr
    assert elapsed < 3, f"{args}: answered in {elapsed:.1f} s"
    assert sorted(tmp_path.rglob("*")) == before  # nothing written
    # the reason it is fast: neither PyTorch nor a model family was imported (not a lucky quiet moment)
    traced = subprocess.run([sys.executable, "-X", "importtime", "-m", "harness.cli", *args], capture_output=True,
                            text=True, cwd=tmp_path, timeout=60)
    imported = {line.rsplit("|", 1)[-1].strip() for line in traced.stderr.splitlines() if line.startswith("import ")}
    assert "harness.launch.options" in imported and not {"torch", "timm", "harness.models"} & imported


# --- doctor: the message of the rule it applied ----------------------------------------------------------------


def test_doctor_on_the_synthetic_set_says_so_not_every_official_split(synthetic_root):
    check = check_dataset(DoctorOptions(row="sf_seg_v2", data_root=str(synthetic_root)))
    assert check.verdict == "go" and not check.no_go
    assert check.line() == (f"dataset: {synthetic_root}: the synthetic dataset (24 train, 8 val images), complete by "
                            "its own rule (the synthetic dataset: its generated counts and frame size); a run on it "
                            "proves the pipeline, it never counts")
    assert "official" not in check.line()


# --- the card and the tags of a synthetic run --------------------------------------------------------------------


def card_record(dataset: str) -> TrainRecord:
    """A finished EMA-row record whose four figures all differ (the issue's numbers): the headline is the EMA
    weights' best, the raw weights' final is another figure."""
    raw: PerClass = {name: 40.0 + i for i, name in enumerate(CLASS_NAMES)}
    ema: PerClass = {name: 30.0 + i for i, name in enumerate(CLASS_NAMES)}
    return full_budget_record(
        "sf_seg_v2-ema", 39.53, dataset=dataset, miou_weights="ema", miou_iteration=160, miou_final=43.78,
        miou_ema=39.50, miou_best=43.80, best_iteration=150, miou_ema_best=39.53, best_iteration_ema=160,
        iterations=160, per_class_iou=raw, per_class_iou_ema=ema, train_images=24, val_images=8,
        starting_weights="random", time="2026-12-06T16:00:00Z", path="results/x.json")


def test_a_synthetic_card_has_no_reference_and_its_columns_are_the_weights_they_name():
    spec = load_spec("sf_seg_v2-ema")
    card = reproduction_card(spec, card_record("synthetic"), weights=[])
    verdict = card.split("## Row and verdict", 1)[1].split("## ", 1)[0]
    assert verdict.strip() == ("39.53 mIoU (best evaluation of the EMA weights (UP's auto_save_best)) on the "
                               "synthetic data: no reference, no Δ and no verdict (the table measured Cityscapes; a "
                               "run on other data proves the pipeline, it is never a reproduction).")
    assert "77.4" not in card and "below" not in card and "reference mIoU" not in card
    assert "| class | IoU (raw weights) | IoU (EMA weights) |" in card
    assert "| **mIoU** (final evaluation) | 43.78 | 39.50 |" in card  # raw final, EMA final; not the headline
    assert "| road | 40.00 | 30.00 |" in card
    # a Cityscapes record keeps its reference, Δ and verdict as before
    cityscapes = reproduction_card(spec, card_record("cityscapes"), weights=[])
    assert "| sf_seg_v2-ema | 77.4 | 39.53 | -37.87 | below |" in cityscapes


def test_only_a_cityscapes_run_is_tagged_with_the_reference():
    spec = load_spec("sf_seg_v2-ema")
    synthetic = run_tags(spec, "synthetic", "abc", "train", "bench run")
    assert not {k for k in synthetic if k.startswith("reference")} and synthetic["dataset"] == "synthetic"
    assert run_tags(spec, "cityscapes", "abc", "train", "bench run")["reference"] == "77.4"


# --- the start line's estimate, measured ---------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def window(log: TrainLog, clock: Clock, step: int, seconds: float) -> None:
    clock.now += seconds
    log.report(step, {"train_loss": 1.0, "lr": 0.01, "images_per_s": 4.0, "data_wait_fraction": 0.0})


def test_the_estimate_is_this_machines_rate_and_a_much_slower_run_says_so(capsys):
    import torch

    clock = Clock()
    log = TrainLog("sf_seg_v2-ema", 160, 0, torch.device("cpu"), bar=False, lines=True, clock=clock)
    window(log, clock, 10, 20.0)  # the first window: start-up included, left out of the rate
    window(log, clock, 20, 5.0)  # 10 iterations in 5 s: 2 it/s, 140 to go: 25 + 70 = 95 s
    err = capsys.readouterr().err
    assert err.strip() == ("estimate: about 95 s for this run's 160 iterations, from this machine's rate over "
                           "iterations 10-20 (2.00 it/s; evaluations and checkpoints add to it)")
    window(log, clock, 30, 10.0)  # 20 iterations in 15 s since iteration 10: 35 + 130 * 0.75 = 132.5 s: not 2x
    assert "note:" not in capsys.readouterr().err
    window(log, clock, 40, 100.0)  # 30 in 115 s: 135 + 120 * 115/30 = 595 s, past 2 x 95
    window(log, clock, 50, 100.0)
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert notes == ["note: at iteration 40 the run is much slower than estimated: about 595 s in all at its rate "
                     "since iteration 10 (0.26 it/s), against 95 s estimated at iteration 20; the machine is busier "
                     "than it was (other processes on its cores) or throttled"]


def test_no_spec_holds_a_written_duration():
    assert "expected_s" not in (PROJECT_ROOT / "experiments" / "sf_seg_v2.yaml").read_text()


# --- progress on a terminal without a width ----------------------------------------------------------------------


def pty_of(columns: int) -> tuple[int, int]:
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    return leader, follower


def test_a_terminal_of_zero_columns_gets_plain_lines_not_an_invisible_bar():
    for columns, fits in ((0, False), (MIN_BAR_COLUMNS - 1, False), (80, True)):
        leader, follower = pty_of(columns)
        try:
            with os.fdopen(os.dup(follower), "w") as stream:
                assert stream.isatty() and bar_fits(stream) is fits, columns
        finally:
            os.close(leader)
            os.close(follower)


@pytest.mark.slow
def test_a_run_on_a_zero_column_pty_prints_its_progress_lines(tmp_path, synthetic_root):
    """`script`'s pty: a terminal (isatty) of 0 columns. The run's progress shows as plain lines."""
    from tests.test_faults import TINY

    env = {**os.environ, "SEGBENCH_EXPERIMENTS": str(experiments_with(tmp_path, {"tiny": TINY}))}
    leader, follower = pty_of(0)
    process = subprocess.Popen([*BENCH, "run", "--row", "tiny", "--synthetic", "--iters", "4", "--offline-tracking"],
                               stdout=follower, stderr=follower, stdin=subprocess.DEVNULL, env=env, cwd=tmp_path)
    os.close(follower)
    output = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the follower side closed: the run ended
            break
        if not chunk:
            break
        output += chunk
    os.close(leader)
    assert process.wait(600) == 0, output.decode(errors="replace")
    text = output.decode(errors="replace")
    assert "iter 4/4 loss " in text and " eta " in text, text


# --- bench server, bench weights --verify, latest, predict's folder, speed records ------------------------------


def test_the_server_processes_start_without_starlettes_deprecation_notices():
    code = "import mlflow.server.fastapi_app"
    plain = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    quiet = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                           env=server_environment())
    assert plain.returncode == quiet.returncode == 0
    assert "StarletteDeprecationWarning" in plain.stderr  # the notice this filter is for (gone: drop the filter)
    assert "StarletteDeprecationWarning" not in quiet.stderr and quiet.stderr.strip() == "", quiet.stderr


def test_weights_verify_with_every_file_missing_verified_nothing_and_exits_1(tmp_path, monkeypatch):
    (tmp_path / "weights").mkdir()  # an empty weights folder: nothing to verify
    monkeypatch.setenv("SEGBENCH_WEIGHTS", str(tmp_path / "weights"))
    listed = CliRunner().invoke(main, ["weights", "--rows", "sf_seg_v2*"])
    assert listed.exit_code == 0  # the plain listing stays what it was
    verified = CliRunner().invoke(main, ["weights", "--rows", "sf_seg_v2*", "--verify"])
    assert verified.exit_code == 1 and verified.stdout == listed.stdout
    assert verified.stderr.strip().splitlines()[-1] == (
        "error: --verify verified nothing: all 1 file(s) are missing; bring them from the sources shown, then verify "
        "again")
    assert not any((tmp_path / "weights").iterdir())


def test_the_weights_table_fits_a_wide_terminal_not_330_columns():
    listed = CliRunner().invoke(main, ["weights"])
    lines = listed.stdout.splitlines()
    widest = max(len(line) for line in lines)
    longest_source = max(len(word) for word in listed.stdout.split())  # a URL is never cut
    # The file column holds each file's absolute path, as long as the checkout's own: the rest must fit 160 columns
    # (it took about 290 before the rows and sources wrapped).
    files = max(len(line.split()[0]) for line in lines if line.split() and line.split()[0].endswith(".pth"))
    assert widest - files <= 160 and longest_source < widest, (widest, files)


def test_latest_stands_for_the_rows_newest_run_folder(tmp_path):
    row = tmp_path / "runs" / "synthetic" / "df_seg_v1"
    for stamp in ("20261206-101500", "20261206-111500"):
        (row / stamp / "checkpoints").mkdir(parents=True)
        (row / stamp / RUN_FILE).write_text("{}")
    (row / "evals").mkdir()  # not a run folder
    path = row / "latest" / "checkpoints" / "best.pt"
    assert resolve_latest(path) == row / "20261206-111500" / "checkpoints" / "best.pt"
    assert resolve_latest(row / "20261206-101500" / "x.pt") == row / "20261206-101500" / "x.pt"
    with pytest.raises(BenchError, match="no run folder under .*df_seg_v2 for `latest`"):
        resolve_latest(tmp_path / "runs" / "synthetic" / "df_seg_v2" / "latest" / "checkpoints" / "best.pt")


def test_predict_writes_beside_the_run_not_into_the_working_directory(tmp_path, isolated_outputs):
    run = tmp_path / "runs" / "synthetic" / "df_seg_v1" / "20261206-111500"
    assert predictions_dir(run / "checkpoints" / "best.pt", "val", "raw") == run / "predictions" / "val-raw"
    assert predictions_dir(tmp_path / "model.pt", "test", "ema") == \
        isolated_outputs / "runs" / "predictions" / "model-test-ema"


# --- benchmark.md's prose, and the test summary on a user's clone ------------------------------------------------


def test_benchmark_md_prose_is_wrapped_and_the_committed_file_is_what_bench_table_writes(tmp_path, monkeypatch):
    committed = (PROJECT_ROOT / "benchmark.md").read_text()
    prose = [line for line in committed.splitlines() if not line.startswith("|")]
    assert max(len(line) for line in prose) <= PROSE_WIDTH, max(prose, key=len)
    monkeypatch.setenv("SEGBENCH_RESULTS", str(PROJECT_ROOT / "results"))
    monkeypatch.setenv("SEGBENCH_BENCHMARK", str(tmp_path / "benchmark.md"))
    assert CliRunner().invoke(main, ["table"]).exit_code == 0
    assert (tmp_path / "benchmark.md").read_text() == committed


def test_the_missing_reference_material_is_one_skip_line_in_the_summary(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT")}
    env.update(SEGBENCH_REFERENCE=str(tmp_path / "no-reference"), SEGBENCH_SEED_TABLE=str(tmp_path / "no-reference"
                                                                                           / "seed-table.md"))
    result = subprocess.run([sys.executable, "-m", "pytest", "-n", "0", "-p", "no:cacheprovider", "-rs", "-q",
                             "-m", "not slow", "tests/test_up_recipes.py", "tests/test_specs.py"],
                            capture_output=True, text=True, cwd=PROJECT_ROOT, env=env, timeout=600)
    skips = [line for line in result.stdout.splitlines() if "not beside this checkout" in line]
    counted = json.loads(json.dumps(skips))
    assert len(counted) == 1, result.stdout[-3000:]
    assert counted[0].startswith("SKIPPED [") and int(counted[0].split("[", 1)[1].split("]", 1)[0]) > 1
