"""Resilience on CPU: resume is exact, signals checkpoint, damaged checkpoints are skipped, divergence fails
cleanly, the global batch is checked before launch, and 1 or 2 processes train the same model."""

from __future__ import annotations

import json
import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from harness.cli import main
from harness.config.precision import Compute, resolve_compute
from harness.engine import checkpoint
from harness.engine.distributed import World
from harness.engine.train import convert_norm
from harness.errors import BenchError
from harness.launch.options import worker_argv
from harness.launch.run import RunOptions, run
from harness.paths import default_tracking_uri, runs_dir
from harness.report.records import load_records
from harness.tracking.tracker import experiment_name
from tests.helpers import PAIR, bench, experiments_with, held, stop_at

pytestmark = pytest.mark.slow

# A small, fast row: DF-Seg v1 with EMA, tiny crops, checkpoints every 4 iterations.
TINY = {
    "inherit": "df_seg_v1-ema",
    "reference": {"miou": [1.0]},
    "synthetic": {"iters": 16, "batch_size": 2, "crop_size": [64, 64], "test_size": [128, 64],
                  "checkpoint_every": 4, "log_every": 1},
}


@pytest.fixture
def tiny_row(tmp_path, monkeypatch, synthetic_root):
    monkeypatch.setenv("SEGBENCH_EXPERIMENTS", str(experiments_with(tmp_path, {"tiny": TINY})))
    return "tiny"


def final_state(record: dict) -> dict:
    return torch.load(record.checkpoint, map_location="cpu", weights_only=True)


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def run_dirs(row: str) -> list[Path]:
    return sorted((runs_dir() / "synthetic" / row).glob("*"))


def test_sigkill_then_resume_equals_uninterrupted_run(tiny_row, tmp_path):
    reference = run(RunOptions(row=tiny_row, synthetic=True, deterministic=True, progress=False))

    # Killed after iteration 10, between the checkpoints at 8 and 12: the resume redoes iterations 9 and 10.
    ready = tmp_path / "killed"
    process = bench("run", "--row", tiny_row, "--synthetic", "--deterministic",
                    env=stop_at(10, "SIGKILL", ready))  # SIGKILL: no handler runs, nothing is flushed
    process.communicate(timeout=300)
    assert process.returncode == -signal.SIGKILL and held(ready)["iteration"] == 10
    killed_run = run_dirs(tiny_row)[-1]
    assert not (killed_run / "checkpoints" / "ckpt-00000016.pt").exists(), "the run finished before it was killed"
    assert checkpoint.load_latest(killed_run / "checkpoints")[0]["iteration"] == 8

    resumed = run(RunOptions(row=tiny_row, synthetic=True, deterministic=True, resume="latest", progress=False))
    assert Path(resumed.checkpoint).parent.parent == killed_run
    a, b = final_state(reference), final_state(resumed)
    assert a["iteration"] == b["iteration"] == 16
    assert_same_tensors(a["model"], b["model"])
    assert_same_tensors(a["ema"], b["ema"])
    assert resumed.miou == reference.miou and resumed.miou_ema == reference.miou_ema
    # The resumed training went on in the killed run's MLflow run, which now finished.
    client = MlflowClient(default_tracking_uri())
    assert client.get_run(resumed.tracking_run_id).info.status == "FINISHED"
    assert len(client.search_runs([client.get_experiment_by_name(experiment_name("synthetic")).experiment_id])) == 2


def test_sigterm_checkpoints_and_the_next_resume_goes_on(tiny_row, tmp_path):
    # SIGTERM while the run is held after iteration 6 (past the checkpoint at 4): it stops at the next log point,
    # iteration 6 itself (a log point every iteration), with a checkpoint there.
    ready = tmp_path / "held"
    process = bench("run", "--row", tiny_row, "--synthetic", env=stop_at(6, "wait", ready))
    held(ready, process)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM" in err and "--resume" in err and "Traceback" not in err
    state, path = checkpoint.load_latest(run_dirs(tiny_row)[-1] / "checkpoints")
    stopped_at = state["iteration"]
    assert stopped_at == 6 and path.name == "ckpt-00000006.pt", path
    client = MlflowClient(default_tracking_uri())
    run_id = next(iter(client.search_runs([client.get_experiment_by_name(experiment_name("synthetic")).experiment_id])))
    assert run_id.info.status == "KILLED"

    resumed = run(RunOptions(row=tiny_row, synthetic=True, resume="latest", progress=False))
    assert resumed.iterations == 16 and final_state(resumed)["iteration"] == 16
    history = client.get_metric_history(resumed.tracking_run_id, "train/lr")
    assert max(m.step for m in history) == 16 and min(m.step for m in history) == 1


def test_log_lines_without_a_terminal_and_a_bare_resume_keeps_the_original_options(tiny_row, tmp_path):
    """stdout is a pipe here, as in a Slurm log: a startup line and one plain line per log interval there, and no
    progress-bar frames anywhere. After SIGTERM (sent while the run is held after iteration 6), `--resume` alone
    continues with the options the run started with (--synthetic --iters 40)."""
    ready = tmp_path / "held"
    process = bench("run", "--row", tiny_row, "--synthetic", "--iters", "40", env=stop_at(6, "wait", ready))
    held(ready, process)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, err
    startup = [line for line in out.splitlines() if line.startswith("segbench: ")]
    assert len(startup) == 1 and f"{tiny_row} on synthetic" in startup[0] and "run folder" in startup[0], out
    iteration_lines = [line for line in out.splitlines() if line.startswith("iter ")]
    assert len(iteration_lines) >= 4 and all("/40 loss " in line and " eta " in line for line in iteration_lines), out
    assert "\r" not in out + err

    resumed = run(RunOptions(row=tiny_row, resume="latest", progress=False))
    assert resumed.dataset == "synthetic" and resumed.iterations == 40 and final_state(resumed)["iteration"] == 40


def test_truncated_checkpoint_falls_back_to_previous_with_warning(tmp_path, capsys):
    folder = tmp_path / "checkpoints"
    checkpoint.save({"iteration": 4, "w": torch.ones(3)}, folder, 4, keep=2)
    newest = checkpoint.save({"iteration": 8, "w": torch.zeros(1000)}, folder, 8, keep=2)
    newest.write_bytes(newest.read_bytes()[: len(newest.read_bytes()) // 2])
    state, path = checkpoint.load_latest(folder)
    assert state["iteration"] == 4 and path.name == "ckpt-00000004.pt"
    err = capsys.readouterr().err
    assert "warning" in err and newest.name in err


def test_checkpoints_are_written_through_a_rename_and_pruned(tmp_path):
    folder = tmp_path / "checkpoints"
    for it in (2, 4, 6):
        checkpoint.save({"iteration": it}, folder, it, keep=2)
    assert [p.name for p in checkpoint.checkpoints(folder)] == ["ckpt-00000006.pt", "ckpt-00000004.pt"]
    assert not list(folder.glob(".*.tmp"))


def test_resume_with_changed_spec_names_the_keys(tiny_row, tmp_path, monkeypatch):
    from harness.engine.train import Trainer

    def crash(self, loader):
        raise RuntimeError("simulated crash after the iteration-4 checkpoint")

    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "run_evaluation", crash)
        with pytest.raises(RuntimeError):
            run(RunOptions(row=tiny_row, synthetic=True, iters=8, progress=False))
    experiments_with(tmp_path, {"tiny": {**TINY, "train": {"weight_decay": 0.01}}})
    with pytest.raises(BenchError, match=r"recipe changed: plan.weight_decay \(0.0005 -> 0.01\), spec.train.weight_decay"):
        run(RunOptions(row=tiny_row, synthetic=True, iters=8, resume="latest", progress=False))
    # A bare resume takes the run's own --iters 8; one given again and different is a changed recipe.
    with pytest.raises(BenchError, match=r"recipe changed: plan.iters \(8 -> 16\)"):
        experiments_with(tmp_path, {"tiny": TINY})
        run(RunOptions(row=tiny_row, synthetic=True, iters=16, resume="latest", progress=False))


def test_finished_run_is_not_resumed(tiny_row):
    record = run(RunOptions(row=tiny_row, synthetic=True, iters=2, progress=False))
    with pytest.raises(BenchError, match="finished; start a new run without --resume"):
        run(RunOptions(row=tiny_row, synthetic=True, iters=2, resume="latest", progress=False))
    with pytest.raises(BenchError, match="already finished"):
        run(RunOptions(row=tiny_row, synthetic=True, iters=2, resume=record.checkpoint, progress=False))


def test_divergence_stops_with_failed_run_and_no_record(tmp_path, monkeypatch, synthetic_root):
    exploding = {**TINY, "synthetic": {**TINY["synthetic"], "lr": 1.0e30}}
    monkeypatch.setenv("SEGBENCH_EXPERIMENTS", str(experiments_with(tmp_path, {"exploding": exploding})))
    with pytest.raises(BenchError, match=r"loss is not finite at iteration \d+"):
        run(RunOptions(row="exploding", synthetic=True, progress=False))
    client = MlflowClient(default_tracking_uri())
    (failed,) = client.search_runs([client.get_experiment_by_name(experiment_name("synthetic")).experiment_id])
    assert failed.info.status == "FAILED"
    assert load_records() == []


def test_batch_that_does_not_divide_is_refused_before_anything_starts(tmp_path, monkeypatch):
    odd = {**TINY, "synthetic": {**TINY["synthetic"], "batch_size": 3}}
    root = experiments_with(tmp_path, {"odd": odd})
    result = CliRunner().invoke(main, ["run", "--row", "odd", "--synthetic", "--gpus", "2"],
                                env={"SEGBENCH_EXPERIMENTS": str(root)})
    assert result.exit_code != 0
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "batch size 3 does not divide over 2 processes" in result.stderr
    assert not runs_dir().exists() and load_records() == []


def test_syncbn_conversion_only_for_distributed_gpu_runs():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    assert convert_norm(model, World(0, 1, 0), "cuda") is model
    assert convert_norm(model, World(0, 2, 0), "cpu") is model
    converted = convert_norm(model, World(0, 2, 0), "cuda")
    assert isinstance(converted[1], torch.nn.SyncBatchNorm) and not any(
        type(m) is torch.nn.BatchNorm2d for m in converted.modules())


def test_compute_is_what_was_asked_for_on_either_device_with_the_device_defaults_kept():
    assert resolve_compute("cuda") == Compute("bf16", channels_last=True, fused=True)
    assert resolve_compute("cpu") == Compute("fp32", channels_last=False, fused=False)
    assert resolve_compute("cpu", "bf16", True, True) == Compute("bf16", channels_last=True, fused=True)
    assert resolve_compute("cuda", "fp32", False, False) == Compute("fp32", channels_last=False, fused=False)
    # The flags reach the workers torchrun or a sweep starts: an on/off pair set off is spelled --no-...
    argv = worker_argv(RunOptions(row="df_seg_v1", precision="bf16", channels_last=True, fused=False), [0])
    assert "--channels-last" in argv and "--no-fused" in argv and argv[argv.index("--precision") + 1] == "bf16"
    params = main.commands["run"].make_context("run", argv[1:]).params  # and `bench run` parses them back
    assert (params["channels_last"], params["fused"], params["precision"]) == (True, False, "bf16")


def test_two_gloo_processes_equal_one_process(tmp_path, monkeypatch, synthetic_root, pair_reference):
    """Same global batch and seed on 1 and 2 CPU processes (PAIR: no dropout, frozen batch norm, plain
    cross-entropy, padded crops): same losses, same weights, up to float summation order."""
    root = experiments_with(tmp_path, {"pair": PAIR})
    single = bench("run", "--row", "pair", "--synthetic", "--device", "cpu",
                   env={"SEGBENCH_EXPERIMENTS": str(root), "OMP_NUM_THREADS": "1"})
    out, err = single.communicate(timeout=600)
    assert single.returncode == 0, err

    (one,) = load_records(dataset="synthetic")
    two = pair_reference.record
    assert (one.devices, two.devices) == (1, 2) and one.batch_size == two.batch_size == 4
    client = MlflowClient(default_tracking_uri())
    history = client.get_metric_history(one.tracking_run_id, "train/loss")
    losses = [m.value for m in sorted(history, key=lambda m: m.step)]
    assert len(losses) == 3 and losses == pytest.approx(pair_reference.losses, rel=1e-4)
    a, b = final_state(one)["model"], pair_reference.state["model"]
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), rtol=1e-4, atol=1e-5), key
    assert two.miou == pytest.approx(one.miou, abs=0.5)


def test_sigterm_to_one_of_two_processes_stops_both_with_one_checkpoint_that_resumes(tmp_path, monkeypatch,
                                                                                     synthetic_root):
    """A signal reaching one rank only, at a random iteration (that rank held there until it comes): the stop is
    decided from the all-reduced flag, so both ranks stop at the same log point, rank 0 writes one checkpoint, every
    process exits cleanly, and the run resumes from it to the end."""
    pair = {**TINY, "synthetic": {**TINY["synthetic"], "batch_size": 4, "iters": 14, "checkpoint_every": 100}}
    monkeypatch.setenv("SEGBENCH_EXPERIMENTS", str(experiments_with(tmp_path, {"pair": pair})))
    chooser = random.Random(29)  # seeded: a failure names its iteration and rank, and reruns the same
    at, rank = chooser.randint(1, 8), chooser.randint(0, 1)
    ready = tmp_path / "held"
    process = bench("run", "--row", "pair", "--synthetic", "--device", "cpu", "--gpus", "2",
                    env=stop_at(at, "wait", ready, rank=rank))
    os.kill(held(ready, process)["pid"], signal.SIGTERM)
    out, err = process.communicate(timeout=300)
    context = f"SIGTERM to rank {rank} after iteration {at}:\n{err}"
    assert process.returncode == 128 + signal.SIGTERM, context
    assert "Traceback" not in err and err.count("stopped by SIGTERM") == 1, context
    said = [line for line in err.splitlines() if "starts from random weights" in line or ": loaded " in line]
    assert len(said) == 1, context  # each rank loads the starting weights; rank 0 alone says so
    (folder,) = run_dirs("pair")
    saved = checkpoint.checkpoints(folder / "checkpoints")
    assert len(saved) == 1, (saved, context)
    stopped_at = checkpoint.load(saved[0])["iteration"]
    # held after `at`, a log point (one every iteration): both ranks stop there
    assert stopped_at == at and f"at iteration {stopped_at}" in err, context
    assert json.loads((folder / "run.json").read_text())["status"] == "interrupted"

    resumed = bench("run", "--row", "pair", "--resume", "--device", "cpu", "--gpus", "2")
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    (record,) = load_records(dataset="synthetic")
    assert record.iterations == 14 and final_state(record)["iteration"] == 14 and record.devices == 2
    client = MlflowClient(default_tracking_uri())
    assert client.get_run(record.tracking_run_id).info.status == "FINISHED"


def test_the_log_says_once_when_training_waits_for_data(capsys):
    from harness.engine.train import TrainLog

    log = TrainLog("row", 100, 0, torch.device("cpu"), bar=False, lines=True, workers=3)
    window = {"train_loss": 1.0, "lr": 0.01, "images_per_s": 12.0}
    log.report(10, {**window, "data_wait_fraction": 0.9})  # the workers' start-up window: not a verdict
    log.report(20, {**window, "data_wait_fraction": 0.05})
    assert "note:" not in capsys.readouterr().err
    log.report(30, {**window, "data_wait_fraction": 0.6})
    log.report(40, {**window, "data_wait_fraction": 0.6})
    err = capsys.readouterr().err
    assert err.count("note: training waited for data 60% of the time up to iteration 30") == 1
    assert "3 loader workers" in err and "--decoded-cache" in err


def test_five_periodic_checkpoints_keep_the_last_k_and_best_pt_is_a_link_not_a_copy(tmp_path, monkeypatch,
                                                                                   synthetic_root, one_thread):
    """`synthetic.keep_checkpoints` (3 here, not the default) is what the run keeps; best.pt (the final evaluation) is
    the newest checkpoint's file under a second name; the run's folder size is printed once per file."""
    row = {**TINY, "synthetic": {**TINY["synthetic"], "iters": 10, "checkpoint_every": 2, "keep_checkpoints": 3}}
    monkeypatch.setenv("SEGBENCH_EXPERIMENTS", str(experiments_with(tmp_path, {"keeper": row})))
    result = CliRunner().invoke(main, ["run", "--row", "keeper", "--synthetic"])
    assert result.exit_code == 0, result.output
    (folder,) = run_dirs("keeper")
    names = sorted(p.name for p in (folder / "checkpoints").iterdir())
    # written at 2, 4, 6, 8 and 10 (five), the three newest kept, nothing half-written left
    assert names == ["best.pt", "ckpt-00000006.pt", "ckpt-00000008.pt", "ckpt-00000010.pt"], names
    best, newest = folder / "checkpoints" / "best.pt", folder / "checkpoints" / "ckpt-00000010.pt"
    assert best.samefile(newest) and best.stat().st_nlink == 2
    assert checkpoint.load(best)["iteration"] == 10
    size_line = next(line for line in result.output.splitlines() if line.startswith("run folder "))
    assert "(checkpoints: best.pt = ckpt-00000010.pt, ckpt-00000006.pt, ckpt-00000008.pt, ckpt-00000010.pt)" \
        in size_line
    files = [p for p in folder.rglob("*") if p.is_file()]
    once = sum(p.stat().st_blocks * 512 for p in files) - best.stat().st_blocks * 512
    shown = float(size_line.split(": ")[1].split(" MiB")[0])
    assert abs(shown - once / 2**20) < 0.6, (shown, once / 2**20)  # the linked file counted once


def test_best_pt_is_a_copy_where_the_filesystem_has_no_hard_links(tmp_path, monkeypatch):
    folder = tmp_path / "checkpoints"
    first = checkpoint.save({"iteration": 2, "w": torch.ones(10)}, folder, 2, keep=2)
    checkpoint.mark_best(first)
    newer = checkpoint.save({"iteration": 4, "w": torch.zeros(10)}, folder, 4, keep=2)

    def no_links(source, target):
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    best = checkpoint.mark_best(newer)
    assert not best.samefile(newer) and best.read_bytes() == newer.read_bytes()
    assert checkpoint.load(best)["iteration"] == 4
    assert sorted(p.name for p in folder.iterdir()) == ["best.pt", "ckpt-00000002.pt", "ckpt-00000004.pt"]


def test_ctrl_c_answers_at_once_and_a_second_one_stops_now_keeping_the_last_checkpoint(tmp_path, monkeypatch,
                                                                                       synthetic_root):
    """Checkpoints every 20 iterations: Ctrl-C while the run is held after iteration 25 (past the first one) is
    acknowledged at once, while the training still stands there (told by the order of events, not by a wall-clock
    window), naming the iteration it will stop at; Ctrl-C again stops at once, at iteration 25, without writing,
    leaving the iteration-20 checkpoint whole and the run marked interrupted in run.json and in MLflow."""
    import threading

    row = {**TINY, "synthetic": {**TINY["synthetic"], "iters": 4000, "checkpoint_every": 20, "log_every": 20}}
    monkeypatch.setenv("SEGBENCH_EXPERIMENTS", str(experiments_with(tmp_path, {"patient": row})))
    ready = tmp_path / "held"
    process = bench("run", "--row", "patient", "--synthetic",  # OMP_NUM_THREADS: see `one_thread`
                    env={"OMP_NUM_THREADS": "1", **stop_at(25, "wait", ready, signals=2)})
    lines: list[str] = []
    assert process.stderr is not None
    reader = threading.Thread(target=lambda: lines.extend(process.stderr), daemon=True)
    reader.start()
    held(ready, process)
    process.send_signal(signal.SIGINT)
    deadline = time.monotonic() + 60  # a bound on waiting, not the check: the order below is
    while not any("Ctrl-C again" in line for line in lines) and time.monotonic() < deadline:
        time.sleep(0.02)
    ack = next((line for line in lines if "Ctrl-C again" in line), None)
    assert ack is not None, lines
    assert ack.strip() == "stopping at iteration 40 (the next log point); Ctrl-C again to stop now without a " \
                          "checkpoint", ack
    process.send_signal(signal.SIGINT)
    process.wait(timeout=60)
    reader.join(timeout=10)
    err = "".join(lines)
    assert process.returncode == 128 + signal.SIGINT, (process.returncode, err)
    # stopped where it was held when the first Ctrl-C came: acknowledged there, before any further iteration
    assert "stopped at once by a second SIGINT at iteration 25, without a checkpoint" in err, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    (folder,) = run_dirs("patient")
    assert f"the last checkpoint is {folder / 'checkpoints' / 'ckpt-00000020.pt'}" in err, err
    assert sorted(p.name for p in (folder / "checkpoints").iterdir()) == ["ckpt-00000020.pt"]
    state, _ = checkpoint.load_latest(folder / "checkpoints")
    assert state["iteration"] == 20
    assert json.loads((folder / "run.json").read_text())["status"] == "interrupted"
    client = MlflowClient(default_tracking_uri())
    (tracked,) = client.search_runs([client.get_experiment_by_name(experiment_name("synthetic")).experiment_id])
    assert tracked.info.status == "KILLED"
