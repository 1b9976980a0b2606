"""The cluster path for real: runs finishing at once all reach the table; a tracking server on PostgreSQL takes four
jobs at once; `bench sweep` on a real one-node Slurm (submit, status, requeue as a preemption, cancel); two nodes
of one process train exactly like one node of two, by hand and as a Slurm job of two tasks."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from harness.cli import main
from harness.launch.options import RunOptions
from harness.launch.sweep import TrainingJob, job_env, read_state, sweeps_dir
from harness.config.spec import load_all, load_spec
from harness.paths import PROJECT_ROOT, runs_dir
from harness.report.figure import gflops_by_row
from harness.report.records import load_records
from harness.report.verdicts import measured_miou
from tests.cluster import free_port
from tests.helpers import PAIR, bench, experiments_with, held, stop_at
from tests.table_fixtures import line_of
from tests.test_training_resilience import TINY, assert_same_tensors


def one_line_error(args: list[str]) -> str:
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1, (args, result.output)
    return result.stderr


# --- concurrent finishers ---------------------------------------------------------------------------------

FINISHER = """
import sys, time
from pathlib import Path
from tests.table_fixtures import full_budget_record
from harness.report.records import write_result_record
from harness.report.table import write_benchmark
seed, go = int(sys.argv[1]), Path(sys.argv[2])
go.with_name(f"ready-{seed}").touch()
while not go.exists():
    time.sleep(0.005)
write_result_record(full_budget_record("bisenet-r18", 70.0 + seed / 10, seed=seed))
write_benchmark(after_record=True)
"""


def test_eight_runs_finishing_at_once_all_reach_the_table(tmp_path, monkeypatch):
    """What eight jobs of a sweep do when they end together: each writes its record and renders benchmark.md and
    benchmark.png. The rendering reads the records and writes under one lock, through temporary files of their
    own: every process succeeds, the final table holds all eight runs, and no temporary file is left."""
    experiments = tmp_path / "experiments"
    shutil.copytree(PROJECT_ROOT / "experiments" / "_base", experiments / "_base")
    shutil.copy(PROJECT_ROOT / "experiments" / "bisenet-r18.yaml", experiments)
    table = yaml.safe_load((PROJECT_ROOT / "experiments" / "_table.yaml").read_text())
    (experiments / "_table.yaml").write_text(yaml.safe_dump({**table, "rows": ["bisenet-r18"]}))
    monkeypatch.setenv("SEGBENCH_EXPERIMENTS", str(experiments))
    monkeypatch.setenv("SEGBENCH_CACHE", str(tmp_path / "cache"))
    markdown = tmp_path / "site" / "benchmark.md"
    monkeypatch.setenv("SEGBENCH_BENCHMARK", str(markdown))
    gflops_by_row(load_all())  # the figure's cached network sizes, as the sweep's first finished run leaves them
    go = tmp_path / "go"
    finishers = [subprocess.Popen([sys.executable, "-c", FINISHER, str(seed), str(go)], cwd=PROJECT_ROOT,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for seed in range(8)]
    deadline = time.time() + 300
    while len(list(tmp_path.glob("ready-*"))) < 8 and time.time() < deadline:  # all imported: they finish at once
        time.sleep(0.05)
    go.touch()
    outcomes = [(p.wait(timeout=300), p.stderr.read()) for p in finishers]  # type: ignore[union-attr]
    assert all(code == 0 for code, _ in outcomes), outcomes
    line = line_of(markdown.read_text(), "bisenet-r18")
    assert line["runs"] == "8", line
    assert sorted(line["measured mIoU (runs)"].split(" \\| ")) == [f"{70 + seed / 10:.2f}" for seed in range(8)]
    assert len(load_records(dataset="cityscapes")) == 8
    assert markdown.with_name("benchmark.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in markdown.parent.iterdir()) == [".benchmark.md.lock", "benchmark.md", "benchmark.png"]


# --- tracking server --------------------------------------------------------------------------------------


def test_bench_server_refuses_what_cannot_be_a_store_in_one_line(tmp_path):
    assert "that is a tracking server" in one_line_error(["server", "--backend-store-uri", "http://127.0.0.1:5000"])
    assert "give a database URI" in one_line_error(["server", "--backend-store-uri", str(tmp_path)])
    missing = tmp_path / "nowhere"
    error = one_line_error(["server", "--backend-store-uri", f"postgresql://postgres@/mlflow?host={missing}"])
    assert "cannot connect to --backend-store-uri" in error and str(missing) in error


def test_a_slurm_sweep_refuses_one_sqlite_file_for_jobs_on_several_nodes(tmp_path, monkeypatch, synthetic_root):
    monkeypatch.setenv("SEGBENCH_EXPERIMENTS", str(experiments_with(tmp_path, {"tiny": TINY})))
    for uri in ([], ["--tracking-uri", f"sqlite:///{tmp_path / 'other.db'}"]):
        error = one_line_error(["sweep", "--rows", "tiny", "--synthetic", "--executor", "slurm", "--dry-run", *uri])
        assert "one SQLite file cannot take their writes" in error and "bench server" in error
    local = CliRunner().invoke(main, ["sweep", "--rows", "tiny", "--synthetic", "--executor", "local", "--dry-run"])
    assert local.exit_code == 0, local.output  # one machine: one SQLite file is fine
    dead = f"http://127.0.0.1:{free_port()}"
    error = one_line_error(["sweep", "--rows", "tiny", "--synthetic", "--executor", "local", "--tracking-uri", dead])
    assert f"tracking server {dead} does not answer" in error and "bench server" in error


@pytest.fixture
def tiny_rows(tmp_path, monkeypatch, synthetic_root):
    """Two rows of the same recipe: at one seed they train the same weights."""
    monkeypatch.setenv("SEGBENCH_EXPERIMENTS", str(experiments_with(tmp_path, {"tiny": TINY, "tiny2": TINY})))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    return ["tiny", "tiny2"]


def sweep_folders() -> list[Path]:
    return sorted(p.parent for p in sweeps_dir().glob("*/sweep.json"))


def run_ids(records: list[dict]) -> list[str]:
    return [r.tracking_run_id for r in records]


@pytest.mark.slow
def test_four_jobs_at_once_log_to_bench_server_on_postgresql(tiny_rows, tracking_server):
    """A local sweep of two rows x two seeds, four jobs at once, every one logging over HTTP to `bench server` on
    a PostgreSQL database: each run ends FINISHED with all its metrics, the table and check agree with the records,
    and the same sweep again submits nothing."""
    uri = tracking_server.uri
    args = ["sweep", "--rows", "tiny,tiny2", "--seeds", "0,1", "--executor", "local", "--max-parallel", "4",
            "--synthetic", "--iters", "2", "--tracking-uri", uri]
    process = bench(*args)
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, out + err
    assert "submitted 4 of 4 job(s) to local" in out, out
    assert [line.split()[2] for line in out.splitlines() if line.startswith(("tiny ", "tiny2 "))][-4:] == ["done"] * 4
    records = load_records(dataset="synthetic")
    assert sorted((r.row, r.seed, r.iterations) for r in records) == [
        ("tiny", 0, 2), ("tiny", 1, 2), ("tiny2", 0, 2), ("tiny2", 1, 2)]
    client = MlflowClient(uri)
    for record in records:
        run = client.get_run(record.tracking_run_id)
        assert run.info.status == "FINISHED" and run.data.tags["kind"] == "train", run.info
        metrics = run.data.metrics
        # logged to 6 significant digits
        assert metrics["miou"] == pytest.approx(measured_miou(load_spec(record.row), record), rel=1e-5), \
            (metrics, record)
        for key in ("final_miou", "best_miou", "final_miou_ema", "val/miou_raw"):
            assert key in metrics, (key, sorted(metrics))
        assert "reference_miou" not in metrics and "delta_miou" not in metrics  # Cityscapes' reference only
        assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1, 2]
        assert client.list_artifacts(run.info.run_id), "artifacts go through the server"

    table = CliRunner().invoke(main, ["table", "--dataset", "synthetic"])
    assert table.exit_code == 0, table.output
    for row in tiny_rows:
        line = line_of(table.output, row)
        values = [measured_miou(load_spec(row), r) for r in records if r.row == row]
        assert line["runs"] == "2" and line["mean"] == f"{sum(values) / 2:.2f}", line
    check = CliRunner().invoke(main, ["check", "--rows", "tiny*", "--json"])
    assert check.exit_code == 0, check.output
    verdicts = {v["row"]: v for v in json.loads(check.output)["rows"]}
    assert {row: (v["n"], v["verdict"]) for row, v in verdicts.items()} == \
        {row: (0, "not run") for row in tiny_rows}  # synthetic runs never count as reproductions

    again = bench(*args)
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, err
    assert "nothing to submit" in out and out.count("done: ") == 4
    assert len(sweep_folders()) == 1 and len(load_records(dataset="synthetic")) == 4


# --- a real Slurm ------------------------------------------------------------------------------------------


def status(sweep: Path) -> dict[tuple[str, int], list[str]]:
    result = CliRunner().invoke(main, ["sweep", "status", str(sweep)])
    assert result.exit_code == 0, result.output
    return {(line.split()[0], int(line.split()[1])): line.split() for line in result.output.splitlines()
            if line.startswith(("tiny ", "tiny2 "))}


def wait_for(condition, timeout: float = 300.0, what: str = "the jobs"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.5)  # each look runs squeue and sacct: a tight loop takes CPU from the jobs
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_sweep_on_a_real_slurm_submits_requeues_resumes_and_cancels(tiny_rows, slurm_cluster, tracking_server,
                                                                   tmp_path, monkeypatch):
    """`bench sweep --executor slurm` through submitit's Slurm executor on a one-node Slurm: two rows x two seeds,
    one CPU each; `bench sweep status` reads Slurm's states; a job requeued with `scontrol requeue` (what a
    preemption does) resumes its run folder from the checkpoint and ends with the weights of the same recipe run
    without interruption; `bench sweep cancel` cancels through scancel."""
    # tiny seed 0's `bench run` is held after iteration 6 (past its checkpoint at 4) until a signal reaches it: the
    # requeue lands while it trains, never after it finished. sbatch hands the jobs this environment.
    ready = tmp_path / "held"
    for name, value in stop_at(6, "wait", ready, row="tiny", seed=0).items():
        monkeypatch.setenv(name, value)
    common = ["--executor", "slurm", "--gpus-per-node", "0", "--partition", "debug", "--time", "00:20:00",
              "--slurm-arg", "cpus-per-task=1", "--synthetic", "--deterministic", "--tracking-uri", tracking_server.uri]
    result = CliRunner().invoke(main, ["sweep", "--rows", "tiny,tiny2", "--seeds", "0,1", "--iters", "16", *common])
    assert result.exit_code == 0, result.output
    (sweep,) = sweep_folders()
    meta = json.loads((sweep / "sweep.json").read_text())
    jobs = {(j["row"], j["seed"]): j for j in meta["jobs"]}
    assert len(jobs) == 4 and all(str(j["job_id"]).isdigit() for j in jobs.values())
    squeue = slurm_cluster.run("squeue", "--noheader", "--format=%i %T")
    assert sorted(line.split()[0] for line in squeue.splitlines()) == sorted(str(j["job_id"]) for j in jobs.values())
    assert {words[2] for words in status(sweep).values()} <= {"pending", "running"}

    target = jobs[("tiny", 0)]
    state_file = Path(target["state_file"])

    held(ready, timeout=600)
    # the job notes its run's folder within half a second of `bench run` making it
    started = wait_for(lambda: read_state(state_file).get("run_folder") and read_state(state_file),
                       what="tiny seed 0's run folder")
    assert started["state"] == "running", started
    requeued = subprocess.run(["scontrol", "requeue", str(target["job_id"])], capture_output=True, text=True)
    assert requeued.returncode == 0, requeued.stderr
    # Slurm holds a requeued job back (cred_expire seconds) before it starts again.
    wait_for(lambda: status(sweep)[("tiny", 0)][2] == "requeued", timeout=120, what="the requeue")

    wait_for(lambda: all(words[2] == "done" for words in status(sweep).values()), timeout=600)
    log = Path(target["log"]).read_text()
    assert "resuming tiny from" in log and "(iteration 6)" in log, log[-3000:]
    final = read_state(state_file)
    assert final["run_folder"] == started["run_folder"] and final["attempt"].split(":")[1] == "1", final
    records = {(r.row, r.seed): r for r in load_records(dataset="synthetic")}
    assert sorted(records) == sorted(jobs)
    assert Path(records[("tiny", 0)].checkpoint).parent.parent == Path(started["run_folder"])
    seed0 = [f for f in (runs_dir() / "synthetic" / "tiny").glob("*/run.json")
             if json.loads(f.read_text())["options"]["seed"] == 0]
    assert len(seed0) == 1  # resumed, not restarted
    a, b = (torch.load(records[(row, 0)].checkpoint, map_location="cpu", weights_only=True)
            for row in ("tiny", "tiny2"))
    assert a["iteration"] == b["iteration"] == 16
    assert_same_tensors(a["model"], b["model"])
    assert_same_tensors(a["ema"], b["ema"])
    runs = MlflowClient(tracking_server.uri)
    assert all(runs.get_run(r.tracking_run_id).info.status == "FINISHED" for r in records.values())

    result = CliRunner().invoke(main, ["sweep", "--rows", "tiny", "--seeds", "2", "--iters", "16", *common])
    assert result.exit_code == 0, result.output
    newest = sweep_folders()[-1]
    (job,) = json.loads((newest / "sweep.json").read_text())["jobs"]
    cancelled = CliRunner().invoke(main, ["sweep", "cancel", str(newest)])
    assert cancelled.exit_code == 0 and f"cancelled tiny seed 2 (job {job['job_id']})" in cancelled.output
    wait_for(lambda: slurm_cluster.run("squeue", "--noheader", "--states=all", "--jobs", str(job["job_id"]),
                                       "--format=%T").strip() == "CANCELLED", timeout=120, what="scancel")
    assert status(newest)[("tiny", 2)][2] == "cancelled"


# --- several nodes ---------------------------------------------------------------------------------------


@pytest.fixture
def pair_row(tmp_path, monkeypatch, synthetic_root):
    monkeypatch.setenv("SEGBENCH_EXPERIMENTS", str(experiments_with(tmp_path, {"pair": PAIR})))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    return "pair"


def assert_same_training(record: dict, reference) -> None:
    assert record.devices == 2 and record.iterations == reference.record.iterations
    state = torch.load(record.checkpoint, map_location="cpu", weights_only=True)
    assert_same_tensors(state["model"], reference.state["model"])
    assert record.miou == reference.record.miou


@pytest.mark.slow
def test_two_nodes_of_one_process_train_like_one_node_of_two(pair_row, pair_reference):
    """Two launches on 127.0.0.1, --nnodes 2 --node-rank 0 and 1: the same ranks, batches and all-reduces as one
    node of two processes, so bit for bit the same weights."""
    port = str(free_port())
    nodes = [bench("run", "--row", pair_row, "--synthetic", "--device", "cpu", "--gpus", "1", "--nnodes", "2",
                   "--node-rank", str(rank), "--master-addr", "127.0.0.1", "--master-port", port)
             for rank in (0, 1)]
    outcomes = [node.communicate(timeout=600) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outcomes
    (record,) = load_records(dataset="synthetic")
    assert_same_training(record, pair_reference)


@pytest.mark.slow
def test_a_slurm_job_of_two_tasks_runs_the_multi_node_path_like_one_node_of_two(pair_row, pair_reference,
                                                                               slurm_cluster, tmp_path):
    """The sweep's job on two nodes, as two Slurm tasks on the one node: task 0 decides what to resume, both run
    `bench run --nnodes 2 --node-rank <task> --master-addr <first host>`, and the result is the one-node run's."""
    import submitit

    executor = submitit.SlurmExecutor(tmp_path / "submitit")
    executor.update_parameters(job_name="segbench", nodes=1, ntasks_per_node=2, cpus_per_task=1, time=20,
                               partition="debug", signal_delay_s=180)
    state_file = tmp_path / "jobs" / "pair-seed0.json"
    options = RunOptions(row=pair_row, synthetic=True, seed=0, tracking_uri=f"sqlite:///{tmp_path / 'job.db'}",
                         device="cpu", progress=False)
    job = executor.submit(TrainingJob(options, gpus=0, nodes=2, env=job_env(), state_file=str(state_file),
                                      max_requeues=1))
    state = wait_for(lambda: read_state(state_file).get("state") in ("done", "failed") and read_state(state_file),
                     timeout=600, what="the two-task job")
    assert state["state"] == "done", (state, Path(job.paths.stderr).read_text()[-3000:])
    (record,) = load_records(dataset="synthetic")
    assert_same_training(record, pair_reference)
    both = [Path(str(job.paths.stderr).replace("_0_log", f"_{task}_log")).read_text() for task in (0, 1)]
    assert all("--nnodes 2 --node-rank" in text for text in both)
    assert "--node-rank 0 --master-addr localhost" in both[0] and "--node-rank 1 --master-addr localhost" in both[1]
