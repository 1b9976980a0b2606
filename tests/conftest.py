"""Shared fixtures: every test writes results, MLflow stores and caches under tmp, never into the repo."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch

from harness.data.synthetic import ensure_synthetic
from harness.logs import configure_logging
from harness.paths import PROJECT_ROOT
from harness.report.records import TrainRecord, load_records
from tests.cluster import postgres_uri, slurm_cluster, tracking_server  # noqa: F401  (session services)
from tests.helpers import PAIR, bench, experiments_with, listening_addresses, process_tree

REFERENCE = Path(os.environ.get("SEGBENCH_REFERENCE", PROJECT_ROOT.parent / "shared" / "reference"))
SEED_TABLE = Path(os.environ.get("SEGBENCH_SEED_TABLE", REFERENCE / "seed-table.md"))


def pytest_configure(config: pytest.Config) -> None:
    """Tests run in parallel workers (pytest-xdist): each worker, and every `bench` process it starts, takes its
    share of the cores, as `bench sweep` gives each of its local jobs; two workers that each started threads for
    the whole machine would oversubscribe it many times over."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        from harness.cores import CORES_ENV, machine_cores

        share = max(1, machine_cores() // int(workers))
        os.environ.setdefault(CORES_ENV, str(share))
        torch.set_num_threads(int(os.environ[CORES_ENV]))


def reference_file(path: Path) -> Path:
    """A file of the reference material beside the checkout (../shared/reference/...). A user's clone has no
    such folder: the test skips there, with the reason. In CI (CI set) the check must never silently
    disappear, so a missing file fails."""
    if not path.exists():
        message = f"reference material {path} is not beside this checkout"
        if os.environ.get("CI"):
            pytest.fail(f"{message}; CI must run beside ../shared/reference/")
        # One reason for every such test (the folder, not each file), so that the summary folds them into one line.
        missing = REFERENCE if path.is_relative_to(REFERENCE) and not REFERENCE.exists() else path
        pytest.skip(f"reference material {missing} is not beside this checkout (a user's clone has none)")
    return path


# Session fixtures that train a model: a test using one is in the slow lane, wherever it is written.
TRAINING_FIXTURES = {"finished_run", "pair_reference"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if TRAINING_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def fast_lane_trains_nothing(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fast lane (`-m "not slow"`) trains nothing: a test outside the slow lane that reaches the training loop in
    this process fails, naming the fix (a `bench` subprocess is not watched)."""
    if request.node.get_closest_marker("slow") is None:
        from harness.engine.train import Trainer

        def refuse(*args: Any, **kwargs: Any) -> None:
            pytest.fail(f"{request.node.nodeid} trains a model outside the slow lane: mark it @pytest.mark.slow")

        monkeypatch.setattr(Trainer, "fit", refuse)


@pytest.fixture(autouse=True, scope="session")
def diagnostics_on_stderr() -> None:
    """The project's notes and warnings on stderr, as the `bench` command shows them, for in-process calls too."""
    configure_logging()


@pytest.fixture(scope="session")
def empty_mlflow_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MLflow SQLite store with MLflow's schema and nothing else, made once: creating the schema takes seconds
    (tens of migrations), and every test starts from its own copy."""
    with built_once(tmp_path_factory, "mlflow-store") as (folder, built):
        if not built:
            from mlflow.tracking import MlflowClient

            MlflowClient(f"sqlite:///{folder / 'mlflow.db'}").search_experiments()
    return folder / "mlflow.db"


@pytest.fixture(autouse=True)
def isolated_outputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, empty_mlflow_store: Path) -> Path:
    shutil.copyfile(empty_mlflow_store, tmp_path / "mlflow.db")
    monkeypatch.setenv("SEGBENCH_RESULTS", str(tmp_path / "results"))
    monkeypatch.setenv("SEGBENCH_BENCHMARK", str(tmp_path / "benchmark.md"))
    monkeypatch.setenv("SEGBENCH_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv("CITYSCAPES_DATASET", raising=False)
    return tmp_path


@contextmanager
def built_once(tmp_path_factory: pytest.TempPathFactory, name: str) -> Iterator[tuple[Path, bool]]:
    """A session's folder shared by its parallel workers: (the folder, whether it is already built). The first
    worker to get here builds it while the others wait on the lock, then reads what it built; a build that fails
    leaves it unbuilt, for the next to try."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # the temporary folder every worker of this session shares
    folder, done = base / name, base / name / ".built"
    with open(base / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        built = done.exists()
        if not built:
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
        yield folder, built
        done.touch()


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One synthetic dataset for the whole session, also used as the --synthetic cache."""
    with built_once(tmp_path_factory, "cache") as (cache, _):
        os.environ["SEGBENCH_CACHE"] = str(cache)
        return ensure_synthetic(cache, seed=0, progress=False)


@pytest.fixture
def one_thread():
    """One intra-op thread: on a shared 2-core machine, two OpenMP threads competing with another process
    make small forwards tens of times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@dataclass
class FinishedRun:
    """One finished synthetic training run (an EMA row of SFNet, 2 iterations) and the outputs it wrote."""

    root: Path
    env: dict[str, str]
    record: TrainRecord
    folder: Path

    @property
    def tracking_uri(self) -> str:
        return self.env["MLFLOW_TRACKING_URI"]


@pytest.fixture(scope="session")
def finished_run(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> FinishedRun:
    """Trained once per session, in its own results, runs and MLflow store: tests that read it point the
    environment there (`monkeypatch.setenv(k, v) for k, v in finished_run.env.items()`) or pass its paths."""
    from harness.launch.run import RunOptions, run

    with built_once(tmp_path_factory, "finished-run") as (root, built):
        env = {"SEGBENCH_RESULTS": str(root / "results"), "SEGBENCH_RUNS": str(root / "runs"),
               "SEGBENCH_BENCHMARK": str(root / "benchmark.md"),
               "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"}
        if not built:
            # benchmark.md and its figure (FLOPs of every row) are no output of this run that its readers look at.
            with mock.patch.dict(os.environ, env), mock.patch("harness.launch.run.write_benchmark"):
                run(RunOptions(row="sf_seg_v1-ema", synthetic=True, iters=2, progress=False))
    (record,) = load_records(root / "results", dataset="synthetic")
    assert isinstance(record, TrainRecord)
    folder = Path(record.checkpoint).parent.parent
    return FinishedRun(root, env, record, folder)


@dataclass
class PairRun:
    """One training of the PAIR row: its record, final checkpoint and logged losses."""

    record: TrainRecord
    state: dict[str, Any]
    losses: list[float]
    listening: set[str]  # local addresses its processes listened on (/proc/net/tcp's hex), seen while it trained


@pytest.fixture(scope="session")
def pair_reference(tmp_path_factory: pytest.TempPathFactory, synthetic_root: Path) -> PairRun:
    """PAIR trained once per session by one node of two gloo processes (`bench run --gpus 2 --device cpu`), one
    intra-op thread each: what one process, two nodes of one process and a Slurm job of two tasks must match."""
    from mlflow.tracking import MlflowClient

    with built_once(tmp_path_factory, "pair") as (root, built):
        env = {"SEGBENCH_RESULTS": str(root / "results"), "SEGBENCH_RUNS": str(root / "runs"),
               "SEGBENCH_BENCHMARK": str(root / "benchmark.md"),
               "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}", "OMP_NUM_THREADS": "1"}
        if not built:
            env["SEGBENCH_EXPERIMENTS"] = str(experiments_with(root, {"pair": PAIR}))
            process = bench("run", "--row", "pair", "--synthetic", "--device", "cpu", "--gpus", "2", env=env)
            listening = ListeningSocketsWatch(process)
            out, err = process.communicate(timeout=600)
            listening.join()
            assert process.returncode == 0, err
            (root / "listening.json").write_text(json.dumps(sorted(listening.seen)))
    (record,) = load_records(root / "results", dataset="synthetic")
    assert isinstance(record, TrainRecord)
    history = MlflowClient(env["MLFLOW_TRACKING_URI"]).get_metric_history(record.tracking_run_id, "train/loss")
    state = torch.load(record.checkpoint, map_location="cpu", weights_only=True)
    listening = set(json.loads((root / "listening.json").read_text()))
    return PairRun(record, state, [m.value for m in sorted(history, key=lambda m: m.step)], listening)


class ListeningSocketsWatch(threading.Thread):
    """Collects, until the process ends, the addresses its process tree listens on (polled every 0.2 s)."""

    def __init__(self, process: subprocess.Popen) -> None:
        super().__init__(daemon=True)
        self.process, self.seen = process, set()
        self.start()

    def run(self) -> None:
        while self.process.poll() is None:
            self.seen |= listening_addresses(process_tree(self.process.pid))
            time.sleep(0.2)


@pytest.fixture
def weights_dir(tmp_path, monkeypatch) -> Path:
    """An empty $SEGBENCH_WEIGHTS folder of the test's own."""
    folder = tmp_path / "weights"
    folder.mkdir()
    monkeypatch.setenv("SEGBENCH_WEIGHTS", str(folder))
    return folder

