"""MLflow tracking that never stops training: one experiment per dataset, one run per training or evaluation.

Everything a run logs goes first to a local journal in its run folder (`tracking/journal.jsonl`, artifacts
copied beside it) and then, from a background thread, to MLflow with short, bounded HTTP timeouts. When the
store goes away mid-run the thread stops sending, training goes on, and `bench sync` later replays what
the journal holds and MLflow lacks (`tracking/sent.jsonl` lists what arrived). `--offline-tracking` only
journals. MLflow's own async logging is not used: it retries for minutes and keeps nothing to replay.
"""

from __future__ import annotations

import json
import math
import os
import queue
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Optional

from harness.errors import BenchError

EXPERIMENT_PREFIX = "segbench"
JOURNAL_DIR = "tracking"
_BATCH = 100  # MLflow's log_batch accepts at most this many params per call
_QUEUE_SIZE = 10000  # entries waiting for the sender; beyond that they stay journalled for `bench sync`
FLUSH_TIMEOUT_S = 30.0  # how long the end of a run waits for a slow store before leaving the rest to `bench sync`
PROBE_TIMEOUT_S = 3.0
# MLflow's own defaults retry a dead server for about four minutes per call; a run must notice within seconds.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "5", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
                 "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.1"}
# The experiment opens on its runs table, not on MLflow 3's GenAI overview.
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}
TERMINAL = ("FINISHED", "FAILED", "KILLED")


def experiment_name(dataset: str) -> str:
    return f"{EXPERIMENT_PREFIX}-{dataset}"


HEADLINE = ("miou", "reference_miou", "delta_miou")  # one per run, ungrouped, so the runs table shows them first


def metric_name(key: str) -> str:
    """The training loop's keys grouped as MLflow charts them: `val_miou` -> `val/miou`, `train_loss` ->
    `train/loss`, anything else of the loop (`lr`, `images_per_s`) under `train/`; grouped names pass."""
    if "/" in key or key in HEADLINE:
        return key
    for group in ("val", "train"):
        if key.startswith(group + "_"):
            return f"{group}/{key[len(group) + 1:]}"
    return f"train/{key}"


def class_key(name: str) -> str:
    return name.replace(" ", "_")


def _artifact_location(tracking_uri: str) -> Optional[str]:
    """Artifacts beside a local SQLite store, instead of MLflow's default of ./mlruns in the working directory."""
    if tracking_uri.startswith("sqlite:///"):
        return (Path(tracking_uri[len("sqlite:///"):]).resolve().parent / "mlartifacts").as_uri()
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


def refuse_read_only_sqlite(database: Path) -> None:
    """SQLite needs to write the file and, for its journal, the folder: MLflow would otherwise retry for minutes."""
    folder = database.parent if database.parent != Path("") else Path(".")
    if database.exists() and not os.access(database, os.W_OK):
        raise BenchError(f"MLflow store {database} is read-only; make it writable, point --tracking-uri elsewhere, "
                         "or pass --offline-tracking")
    if not os.access(folder if folder.exists() else folder.parent, os.W_OK):
        raise BenchError(f"MLflow store folder {folder} is read-only (SQLite writes its journal there); make it "
                         "writable, point --tracking-uri elsewhere, or pass --offline-tracking")


def connect(tracking_uri: str):
    """An MlflowClient for `tracking_uri`, failing within seconds with one line when the store cannot be reached."""
    for name, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)
    if tracking_uri.startswith(("http://", "https://")):
        import requests

        try:
            requests.get(tracking_uri.rstrip("/") + "/health", timeout=PROBE_TIMEOUT_S)
        except requests.RequestException as exc:
            raise BenchError(
                f"cannot reach MLflow tracking URI '{tracking_uri}' ({type(exc).__name__}); start the server, "
                "fix --tracking-uri, or pass --offline-tracking to train now and `bench sync` later") from None
    if tracking_uri.startswith("sqlite:///"):
        refuse_read_only_sqlite(Path(tracking_uri[len("sqlite:///"):]))
    from mlflow.tracking import MlflowClient  # mlflow imports slowly; only runs need it

    try:
        client = MlflowClient(tracking_uri=tracking_uri)
        client.search_experiments(max_results=1)
    except Exception as exc:  # MLflow raises many types for a bad URI or an unreadable store
        raise BenchError(f"cannot open MLflow tracking URI '{tracking_uri}': {_first_line(exc)}; fix --tracking-uri "
                         "or pass --offline-tracking") from None
    return client


def ensure_experiment(client, name: str, tracking_uri: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        experiment_id = client.create_experiment(name, artifact_location=_artifact_location(tracking_uri),
                                                 tags=EXPERIMENT_TAGS)
    else:
        experiment_id = experiment.experiment_id
        for key, value in EXPERIMENT_TAGS.items():
            if experiment.tags.get(key) != value:
                client.set_experiment_tag(experiment_id, key, value)
    return experiment_id


def source_tags(commit: str, entry_point: str) -> dict[str, str]:
    """The commit and entry point in MLflow's own source fields, which its UI shows on the run page."""
    from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT, MLFLOW_SOURCE_NAME, MLFLOW_SOURCE_TYPE

    sha, dirty = (commit[:-len("-dirty")], True) if commit.endswith("-dirty") else (commit, False)
    tags = {MLFLOW_SOURCE_NAME: entry_point, MLFLOW_SOURCE_TYPE: "LOCAL", "git_dirty": str(dirty).lower()}
    if sha != "unknown":
        tags[MLFLOW_GIT_COMMIT] = sha
    return tags


# --- the journal ----------------------------------------------------------------------------------


class Journal:
    """What a run logged, in order, and which of it MLflow acknowledged. Only rank 0's main thread appends;
    only the sender acknowledges."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / "journal.jsonl"
        self.sent_path = self.folder / "sent.jsonl"
        self.artifacts = self.folder / "artifacts"
        self._next = len(self.entries())
        self._lock = threading.Lock()

    def append(self, entry: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            entry = {"seq": self._next, **entry}
            self._next += 1
            with self.path.open("a") as f:
                f.write(json.dumps(entry, allow_nan=False) + "\n")
        return entry

    def acknowledge(self, entry: dict[str, Any], **extra: Any) -> None:
        with self._lock:
            with self.sent_path.open("a") as f:
                f.write(json.dumps({"seq": entry["seq"], **extra}) + "\n")

    @staticmethod
    def _read(path: Path) -> list[dict[str, Any]]:
        if not path.is_file():
            return []
        lines = []
        for line in path.read_text().splitlines():
            try:
                lines.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut short by a crash: nothing after it was acknowledged either
        return lines

    def entries(self) -> list[dict[str, Any]]:
        return self._read(self.path)

    def sent(self) -> dict[int, dict[str, Any]]:
        return {a["seq"]: a for a in self._read(self.sent_path)}

    def pending(self) -> list[dict[str, Any]]:
        sent = self.sent()
        return [e for e in self.entries() if e["seq"] not in sent]

    def run_id(self) -> Optional[str]:
        return next((a["run_id"] for a in self.sent().values() if a.get("run_id")), None)

    def header(self) -> dict[str, Any]:
        return next((e for e in self.entries() if e["op"] == "create"), {})

    def metric_history(self) -> dict[str, list[tuple[int, float]]]:
        """Every metric the run logged (sent or not), key -> [(step, value)], for the curves image."""
        history: dict[str, list[tuple[int, float]]] = {}
        for entry in self.entries():
            if entry["op"] == "metrics":
                for key, value in entry["metrics"].items():
                    history.setdefault(key, []).append((entry["step"], value))
        return history


def describe_pending(entries: Iterable[dict[str, Any]]) -> str:
    """'12 metric values (train/loss, val/miou), 2 artifacts (plots/curves.png, ...), the status FINISHED'."""
    values, keys, artifacts, other, status = 0, [], [], 0, None
    for entry in entries:
        if entry["op"] == "metrics":
            values += len(entry["metrics"])
            keys += [k for k in entry["metrics"] if k not in keys]
        elif entry["op"] == "artifact":
            artifacts.append(entry["path"])
        elif entry["op"] == "status":
            status = entry["status"]
        else:
            other += 1
    parts = []
    if other:
        parts.append(f"{other} run, param or tag entries")
    if values:
        shown = ", ".join(keys[:4]) + (", ..." if len(keys) > 4 else "")
        parts.append(f"{values} metric values ({shown})")
    if artifacts:
        shown = ", ".join(artifacts[:3]) + (", ..." if len(artifacts) > 3 else "")
        parts.append(f"{len(artifacts)} artifacts ({shown})")
    if status:
        parts.append(f"the status {status}")
    return "; ".join(p for p in parts if p)


def _send(client, journal: Journal, entry: dict[str, Any], run_id: Optional[str],
          experiment_id: Optional[str] = None) -> Optional[str]:
    """Apply one journal entry to MLflow; returns the run id (created by a 'create' entry)."""
    from mlflow.entities import Metric, Param, RunTag

    op = entry["op"]
    if op == "create":
        if experiment_id is None:
            experiment_id = ensure_experiment(client, entry["experiment"], entry["tracking_uri"])
        run = client.create_run(experiment_id, run_name=entry["run_name"], tags=entry["tags"],
                                start_time=entry["time"])
        journal.acknowledge(entry, run_id=run.info.run_id)
        return run.info.run_id
    if run_id is None:
        raise BenchError(f"journal {journal.path} has no created run before entry {entry['seq']}")
    if op == "params":
        items = [Param(k, str(v)[:6000]) for k, v in sorted(entry["params"].items())]
        for i in range(0, len(items), _BATCH):
            client.log_batch(run_id, params=items[i: i + _BATCH])
    elif op == "tags":
        client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in entry["tags"].items()])
    elif op == "metrics":
        metrics = [Metric(k, v, entry["time"], entry["step"]) for k, v in entry["metrics"].items()]
        for i in range(0, len(metrics), 1000):
            client.log_batch(run_id, metrics=metrics[i: i + 1000])
    elif op == "artifact":
        local = journal.artifacts / entry["path"]
        folder = str(Path(entry["path"]).parent)
        client.log_artifact(run_id, str(local), None if folder == "." else folder)
    elif op == "status":
        if entry["status"] in TERMINAL:
            client.set_terminated(run_id, status=entry["status"], end_time=entry["time"])
        else:
            client.update_run(run_id, status=entry["status"])
    journal.acknowledge(entry)
    return run_id


def replay(journal: Journal, client) -> int:
    """Send every journalled entry MLflow has not acknowledged, in order; returns how many were sent."""
    run_id = journal.run_id()
    pending = journal.pending()
    for entry in pending:
        run_id = _send(client, journal, entry, run_id)
    return len(pending)


def _now_ms() -> int:
    return int(time.time() * 1000)


# --- the tracker ----------------------------------------------------------------------------------


class Tracker:
    """A run's view of MLflow. Start-up talks to the store directly (a dead store fails in seconds with one
    line); everything after goes through the journal and a bounded queue, so training never waits on it."""

    def __init__(self, tracking_uri: str, dataset: str, offline: bool = False):
        self.tracking_uri, self.dataset, self.offline = tracking_uri, dataset, offline
        self.client = None if offline else connect(tracking_uri)
        self.experiment_id: Optional[str] = None
        if self.client is not None:
            try:
                self.experiment_id = ensure_experiment(self.client, experiment_name(dataset), tracking_uri)
            except Exception as exc:
                raise BenchError(f"cannot open MLflow tracking URI '{tracking_uri}': {_first_line(exc)}") from None
        self.run_id: Optional[str] = None
        self.journal: Optional[Journal] = None
        self.failure: Optional[str] = None  # why the sender stopped
        self._queue: queue.Queue = queue.Queue(maxsize=_QUEUE_SIZE)
        self._thread: Optional[threading.Thread] = None
        self.status: Optional[str] = None

    # --- start --------------------------------------------------------------------------------

    def start(self, journal_dir: Path, run_name: str, params: dict[str, Any], tags: dict[str, str]) -> Optional[str]:
        """Create the run (journalled; sent now unless offline) and return its id (None offline)."""
        self.journal = Journal(journal_dir)
        entries = [
            self.journal.append({"op": "create", "experiment": experiment_name(self.dataset), "run_name": run_name,
                                 "tracking_uri": self.tracking_uri, "tags": {**tags, "mlflow.runName": run_name},
                                 "time": _now_ms()}),
            self.journal.append({"op": "params", "params": {k: str(v) for k, v in params.items()}}),
        ]
        if self.client is not None:
            try:
                for entry in entries:
                    self.run_id = _send(self.client, self.journal, entry, self.run_id, self.experiment_id)
            except Exception as exc:
                raise BenchError(f"MLflow at '{self.tracking_uri}' refused the new run: {_first_line(exc)}; "
                                 "fix the store or pass --offline-tracking") from None
        self._start_sender()
        return self.run_id

    def reopen(self, journal_dir: Path, run_id: Optional[str]) -> Optional[str]:
        """Continue a resumed run in its own MLflow run: first replay what the interrupted part did not send."""
        self.journal = Journal(journal_dir)
        if self.client is not None and self.journal.entries():
            try:
                replay(self.journal, self.client)
            except Exception as exc:
                raise BenchError(f"cannot bring the resumed run up to date in MLflow at '{self.tracking_uri}': "
                                 f"{_first_line(exc)}; pass --offline-tracking to continue locally") from None
        self.run_id = self.journal.run_id() or run_id
        self._start_sender()
        self._submit({"op": "status", "status": "RUNNING", "time": _now_ms()})
        return self.run_id

    def _start_sender(self) -> None:
        if self.client is not None:
            self._thread = threading.Thread(target=self._sender, name="mlflow-sender", daemon=True)
            self._thread.start()

    def _sender(self) -> None:
        while True:
            entry = self._queue.get()
            if entry is None:
                return
            if self.failure is not None:
                continue  # stays journalled for `bench sync`
            try:
                self.run_id = _send(self.client, self.journal, entry, self.run_id)
            except Exception as exc:  # a dead or failing store: stop trying, keep training
                self.failure = _first_line(exc)
                print(f"warning: MLflow at {self.tracking_uri} stopped answering ({self.failure}); training "
                      f"continues and logs to {self.journal.folder}; replay later with `bench sync "
                      f"{self.journal.folder.parent}`", file=sys.stderr, flush=True)

    def _submit(self, entry: dict[str, Any]) -> None:
        entry = self.journal.append(entry)
        if self._thread is not None:
            try:
                self._queue.put_nowait(entry)
            except queue.Full:  # a slow store: the entry waits in the journal
                self.failure = self.failure or "too many entries waiting for a slow store"

    # --- logging ------------------------------------------------------------------------------

    def log_metrics(self, metrics: dict[str, Optional[float]], step: int) -> None:
        clean = {metric_name(k): float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}
        if clean:
            self._submit({"op": "metrics", "metrics": clean, "step": int(step), "time": _now_ms()})

    def set_tags(self, tags: dict[str, str]) -> None:
        self._submit({"op": "tags", "tags": {k: str(v) for k, v in tags.items()}})

    def set_tag(self, key: str, value: str) -> None:
        self.set_tags({key: value})

    def log_artifact(self, local: Path, artifact_path: Optional[str] = None) -> None:
        relative = Path(artifact_path or ".") / Path(local).name
        target = self.journal.artifacts / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        if Path(local).resolve() != target.resolve():
            shutil.copyfile(local, target)
        self._submit({"op": "artifact", "path": relative.as_posix()})

    def log_artifacts(self, local_dir: Path, artifact_path: Optional[str] = None) -> None:
        for path in sorted(Path(local_dir).iterdir()):
            if path.is_file():
                self.log_artifact(path, artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        target = self.journal.artifacts / artifact_file
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        self._submit({"op": "artifact", "path": Path(artifact_file).as_posix()})

    def artifact_path(self, artifact_file: str) -> Path:
        """Where to write a file that `log_artifact(path, folder)` will then log without copying."""
        path = self.journal.artifacts / artifact_file
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    # --- the end ------------------------------------------------------------------------------

    def finish(self, status: str = "FINISHED") -> Optional[str]:
        """End the run with `status`, wait (bounded) for the sender, and return a warning naming what MLflow
        did not receive (None when everything arrived). Safe to call twice; the second call does nothing."""
        if self.journal is None or self.status is not None:
            return None
        self.status = status
        self._submit({"op": "status", "status": status, "time": _now_ms()})
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(FLUSH_TIMEOUT_S)
            if self._thread.is_alive():
                self.failure = self.failure or f"the store took longer than {FLUSH_TIMEOUT_S:.0f} s"
        pending = self.journal.pending()
        if not pending:
            return None
        run_folder = self.journal.folder.parent
        if self.offline:
            message = (f"tracking offline: the run is kept in {self.journal.folder}; log it to MLflow with "
                       f"`bench sync {run_folder}`")
        else:
            message = (f"warning: not logged to MLflow at {self.tracking_uri} ({self.failure or 'unknown failure'}): "
                       f"{describe_pending(pending)}; replay with `bench sync {run_folder}`")
        print(message, file=sys.stderr, flush=True)
        return message


def sync_journal(journal_dir: Path, tracking_uri: Optional[str] = None) -> tuple[Optional[str], int]:
    """Replay a run's journal into MLflow: (run id, entries sent). The URI defaults to the one the run used."""
    journal = Journal(journal_dir)
    header = journal.header()
    if not header:
        raise BenchError(f"{journal_dir} holds no tracking journal; give a run folder written by `bench run` or `bench eval`")
    uri = tracking_uri or header["tracking_uri"]
    client = connect(uri)
    try:
        sent = replay(journal, client)
    except BenchError:
        raise
    except Exception as exc:
        raise BenchError(f"sync of {journal_dir} to MLflow at '{uri}' stopped: {_first_line(exc)}; "
                         "run `bench sync` again when the store answers") from None
    return journal.run_id(), sent


# --- the UI ---------------------------------------------------------------------------------------

UI_START_TIMEOUT_S = 90.0


def runs_table_url(host: str, port: int, experiment_id: str) -> str:
    """The experiment's runs table, training runs only, newest first (not MLflow 3's GenAI overview)."""
    from urllib.parse import quote, urlencode

    query = urlencode({"searchFilter": "tags.kind = 'train'", "orderByKey": "attributes.start_time",
                       "orderByAsc": "false"}, quote_via=quote)
    return f"http://{host}:{port}/#/experiments/{experiment_id}/runs?{query}"


def start_ui(dataset: str, tracking_uri: Optional[str], host: str = "127.0.0.1", port: int = 5000, workers: int = 2):
    """Start `mlflow ui` on the store and wait until it answers: (process, URL of the training runs table).
    One user browsing needs few workers; MLflow's default of 4 takes half a minute to start on a small machine."""
    import subprocess

    import requests

    from harness.paths import default_tracking_uri

    uri = tracking_uri or default_tracking_uri()
    experiment_id = ensure_experiment(connect(uri), experiment_name(dataset), uri)
    process = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
                                "--host", host, "--port", str(port), "--workers", str(workers)],
                               stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + UI_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise BenchError(f"the MLflow UI exited with code {process.returncode} (is port {port} taken? pass --port)")
        try:
            if requests.get(f"http://{host}:{port}/health", timeout=2).ok:
                return process, runs_table_url(host, port, experiment_id)
        except requests.RequestException:
            pass
        time.sleep(0.5)
    process.terminate()
    raise BenchError(f"the MLflow UI did not answer on {host}:{port} within {UI_START_TIMEOUT_S:.0f} s")


def serve_ui(dataset: str, tracking_uri: Optional[str], host: str = "127.0.0.1", port: int = 5000) -> None:
    """`bench ui`: serve until Ctrl-C, after printing where the training runs are."""
    process, url = start_ui(dataset, tracking_uri, host, port)
    print(f"MLflow UI ({experiment_name(dataset)} training runs): {url}\nCtrl-C stops it.", flush=True)
    try:
        process.wait()
    except KeyboardInterrupt:
        process.terminate()
        process.wait(10)
