"""`bench sweep` on CPU, through submitit's local executor: survives a preemption by checkpoint + requeue + resume
(same weights as an uninterrupted run), prints the Slurm script without Slurm, and `bench sweep status` reads a
sweep's state from its folder. Local jobs reaching the table and a second sweep skipping them: tests/test_cluster.py
(with a tracking server); a real Slurm: tests/test_cluster.py too."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from harness.cli import main
from harness.launch.run import RunOptions, run
from harness.launch.sweep import TrainingJob, read_state, sweeps_dir, write_state
from harness.paths import runs_dir
from harness.report.records import load_records
from tests.helpers import bench, experiments_with, held, stop_at
from tests.test_training_resilience import TINY, assert_same_tensors

pytestmark = pytest.mark.slow


@pytest.fixture
def tiny_rows(tmp_path, monkeypatch, synthetic_root):
    root = experiments_with(tmp_path, {"tiny": TINY, "tiny2": TINY})
    monkeypatch.setenv("SEGBENCH_EXPERIMENTS", str(root))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    return ["tiny", "tiny2"]


def sweep_folders() -> list[Path]:
    return sorted(p.parent for p in sweeps_dir().glob("*/sweep.json"))


def wait_until(condition, process, timeout=300.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        assert process.poll() is None, process.communicate()
        time.sleep(0.05)
    raise AssertionError("timed out")


def test_preempted_local_job_is_requeued_and_resumes_to_the_same_weights(tiny_rows, tmp_path):
    # The job's `bench run` is held after iteration 6 (past the checkpoint at 4) until the job's SIGTERM reaches it:
    # the preemption lands while the job trains, never after it finished, and the run stops at 6 with a checkpoint.
    ready = tmp_path / "held"
    process = bench("sweep", "--rows", "tiny", "--seeds", "0", "--executor", "local", "--synthetic", "--iters", "20",
                    "--deterministic", env=stop_at(6, "wait", ready))
    held(ready, process)
    (state_file,) = sweeps_dir().glob("*/jobs/tiny-seed0.json")
    # the job notes its run's folder within half a second of `bench run` making it
    state = wait_until(lambda: read_state(state_file).get("run_folder") and read_state(state_file), process)
    assert state["state"] == "running", state
    os.kill(state["pid"], signal.SIGUSR2)  # what Slurm sends before the time limit or on preemption
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, out + err

    final = read_state(state_file)
    assert final["state"] == "done" and final["requeues"] == 1 and final["run_folder"] == state["run_folder"]
    log = Path(json.loads((state_file.parent.parent / "sweep.json").read_text())["jobs"][0]["log"]).read_text()
    assert "resuming tiny from" in log and "(iteration 6)" in log, log
    (swept,) = load_records(dataset="synthetic")
    assert Path(swept.checkpoint).parent.parent == Path(state["run_folder"])
    assert len(list((runs_dir() / "synthetic" / "tiny").glob("*/run.json"))) == 1  # resumed, not restarted

    # The reference trains with the jobs' one thread: OHEM's hard threshold turns a summation-order difference
    # between thread counts into different pixels, and then different weights.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reference = run(RunOptions(row="tiny", synthetic=True, iters=20, deterministic=True, progress=False))
    finally:
        torch.set_num_threads(threads)
    a = torch.load(reference.checkpoint, map_location="cpu", weights_only=True)
    b = torch.load(swept.checkpoint, map_location="cpu", weights_only=True)
    assert a["iteration"] == b["iteration"] == 20
    assert_same_tensors(a["model"], b["model"])
    assert_same_tensors(a["ema"], b["ema"])


def test_slurm_dry_run_prints_the_sbatch_script_and_torchrun_command(tiny_rows):
    result = CliRunner().invoke(main, ["sweep", "--rows", "tiny", "--seeds", "0,1", "--executor", "slurm", "--dry-run",
                                       "--nodes", "2", "--gpus-per-node", "4", "--time", "12:30:00",
                                       "--partition", "big", "--account", "lab", "--slurm-arg", "constraint=a100",
                                       "--synthetic", "--tracking-uri", "http://tracking.lab:5000"])
    assert result.exit_code == 0, result.output
    out = result.output
    for line in ("#SBATCH --nodes=2", "#SBATCH --gpus-per-node=4", "#SBATCH --time=750", "#SBATCH --partition=big",
                 "#SBATCH --account=lab", "#SBATCH --constraint=a100", "#SBATCH --ntasks-per-node=1",
                 "#SBATCH --signal=USR2@"):
        assert line in out, line
    assert "srun" in out and "submitit.core._submit" in out
    commands = [line for line in out.splitlines() if line.startswith("tiny seed ")]
    assert len(commands) == 2
    for seed, line in enumerate(commands):
        assert "run --row tiny --synthetic" in line and f"--seed {seed} --gpus 4 --nnodes 2 --node-rank" in line
        assert "$SLURM_NODEID" in line and "--master-addr" in line and "SLURM_JOB_NODELIST" in line
        assert "--tracking-uri http://tracking.lab:5000" in line
    assert "2 job(s) would be submitted" in out and not sweeps_dir().exists()


def test_sweep_status_shows_each_state(tmp_path):
    sweep = sweeps_dir() / "20250101-000000"
    jobs_dir = sweep / "jobs"
    run_folder = runs_dir() / "synthetic" / "tiny" / "20250101-000001"
    (run_folder / "checkpoints").mkdir(parents=True)
    behind = {"flagged": True, "behind_miou": 3.25, "iteration": 8, "stop": False}  # its early warning at 8
    (run_folder / "run.json").write_text(json.dumps({"status": "finished", "behind": behind}))
    (run_folder / "checkpoints" / "ckpt-00000016.pt").write_bytes(b"")
    logs = tmp_path / "logs"
    logs.mkdir()
    for name, text in {"done": "iter 16/16 loss 0.1\ntiny seed 0 on synthetic: mIoU 1.00\n",
                       "failed": "iter 3/16 loss 0.5\nerror: something broke\n", "pending": ""}.items():
        (logs / f"{name}.err").write_text(text)
    waiting = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # a job still queued
    try:
        write_state(jobs_dir / "done.json", state="done", run_folder=str(run_folder))
        write_state(jobs_dir / "failed.json", state="failed", reason=f"bench run exited with 1; see {logs / 'failed.err'}")
        write_state(jobs_dir / "pending.json", state="submitted")
        write_state(jobs_dir / "requeued.json", state="requeued")
        jobs = [{"row": "tiny", "seed": seed, "iterations": 16, "job_id": str(job_id), "state_file": str(jobs_dir / f"{name}.json"),
                 "log": str(logs / f"{name}.err")}
                for seed, (name, job_id) in enumerate([("done", 999999999), ("failed", 999999999),
                                                       ("pending", waiting.pid), ("requeued", waiting.pid)])]
        (sweep / "sweep.json").write_text(json.dumps({"executor": "local", "host": os.uname().nodename,
                                                      "dataset": "synthetic", "jobs": jobs}))
        import socket
        assert socket.gethostname() == os.uname().nodename
        result = CliRunner().invoke(main, ["sweep", "status", str(sweep)])
        assert result.exit_code == 0, result.output
        lines = {line.split()[1]: line for line in result.output.splitlines() if line.startswith("tiny ")}
        assert lines["0"].split()[2] == "done" and "16/?" in lines["0"] and "mIoU 1.00" in lines["0"]
        assert "behind" in result.output.splitlines()[1] and " 3.2 at 8 " in lines["0"]
        assert lines["1"].split()[2] == "failed" and "exited with 1" in lines["1"] and str(logs / "failed.err") in lines["1"]
        assert lines["2"].split()[2] == "pending" and str(waiting.pid) in lines["2"]
        assert lines["3"].split()[2] == "requeued"
        assert "1 done, 1 failed, 1 pending, 1 requeued" in result.output
    finally:
        waiting.kill()
        waiting.wait()
    # Once its process is gone, a job that never reported is failed, not pending forever.
    result = CliRunner().invoke(main, ["sweep", "status"])
    lines = {line.split()[1]: line for line in result.output.splitlines() if line.startswith("tiny ")}
    assert lines["2"].split()[2] == "failed" and "before it started" in lines["2"]


def test_requeues_are_bounded(tmp_path):
    state = tmp_path / "job.json"
    options = RunOptions(row="tiny", synthetic=True, seed=0, resume=str(tmp_path / "run"))
    again = TrainingJob(options, 1, 1, {}, str(state), max_requeues=2, requeues=1).checkpoint()
    assert again is not None and again.function.requeues == 2 and again.function.run_options.resume == str(tmp_path / "run")
    assert read_state(state)["state"] == "requeued"
    assert TrainingJob(options, 1, 1, {}, str(state), max_requeues=2, requeues=2).checkpoint() is None
    assert read_state(state)["state"] == "failed" and "--max-requeues 2" in read_state(state)["reason"]


def test_bad_sweep_input_is_one_line(tiny_rows):
    for args, message in [(["--rows", "nope*", "--synthetic"], "--rows 'nope*' matches no row"),
                          (["--rows", "tiny", "--synthetic", "--time", "soon"], "--time 'soon'"),
                          (["--rows", "tiny", "--synthetic", "--slurm-arg", "novalue"], "KEY=VALUE"),
                          (["--rows", "tiny"], "no dataset given")]:
        result = CliRunner().invoke(main, ["sweep", *args, "--dry-run"])
        assert result.exit_code == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1, \
            (args, result.output)
