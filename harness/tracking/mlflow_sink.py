"""The MLflow sink: one experiment per dataset, one run per training or evaluation, with short, bounded HTTP
timeouts so that a dead store is noticed in seconds. MLflow's own async logging is not used: it retries for minutes
and keeps nothing to replay."""

from __future__ import annotations

import os
import sqlite3
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Optional

from harness.errors import BenchError
from harness.files import existing_parent
from harness.tracking.backends import StoreCheck, StoredRun, folder_store_check
from harness.tracking.journal import Journal
from harness.tracking.sink import TERMINAL, Sink, first_line

_BATCH = 100  # MLflow's log_batch accepts at most this many params per call
PROBE_TIMEOUT_S = 3.0
# MLflow's own defaults retry a dead server for about four minutes per call; a run must notice within seconds.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "5", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
                 "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.1"}
# The experiment's kind, as MLflow 3 marks it: model training, not GenAI. MLflow 3.17's UI reads it only where its
# GenAI / model-training switch is off; `bench ui`'s URL names the workflow too (harness.tracking.mlflow_ui).
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}
# Starlette's deprecation notice about MLflow's own use of it (one per server worker process): a user can act on
# none of them, and they stood before `bench server`'s URL. Filtered in the server's processes by a warnings filter
# in their environment; PYTHONWARNINGS names the message, since a category outside the standard library cannot be
# named there (Python parses it before site-packages can be imported).
QUIET_SERVER_WARNINGS = "ignore:starlette.middleware.wsgi is deprecated"


def server_environment() -> dict[str, str]:
    """The environment an MLflow server or UI process runs in: without MLflow's GenAI job runner (training runs
    need none of it) and without Starlette's deprecation notices."""
    warnings = ",".join(filter(None, (os.environ.get("PYTHONWARNINGS"), QUIET_SERVER_WARNINGS)))
    return {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "PYTHONWARNINGS": warnings}


def artifact_location(tracking_uri: str) -> Optional[str]:
    """Artifacts beside a local SQLite store, instead of MLflow's default of ./mlruns in the working directory."""
    if tracking_uri.startswith("sqlite:///"):
        return (Path(tracking_uri[len("sqlite:///"):]).resolve().parent / "mlartifacts").as_uri()
    return None


def refuse_read_only_sqlite(database: Path) -> None:
    """SQLite needs to write the file and, for its journal, the folder: MLflow would otherwise retry for minutes."""
    folder = database.parent if database.parent != Path("") else Path(".")
    if database.exists() and not os.access(database, os.W_OK):
        raise BenchError(f"MLflow store {database} is read-only; make it writable, point --tracking-uri elsewhere, "
                         "or pass --offline-tracking")
    if not os.access(folder if folder.exists() else folder.parent, os.W_OK):
        raise BenchError(f"MLflow store folder {folder} is read-only (SQLite writes its journal there); make it "
                         "writable, point --tracking-uri elsewhere, or pass --offline-tracking")


def connect(tracking_uri: str) -> Any:
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
        raise BenchError(f"cannot open MLflow tracking URI '{tracking_uri}': {first_line(exc)}; fix --tracking-uri "
                         "or pass --offline-tracking") from None
    return client


def ensure_experiment(client: Any, name: str, tracking_uri: str) -> str:
    """The experiment's id, created when missing. Jobs starting together on a shared store race to create it: the
    losers take the winner's."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return str(client.create_experiment(name, artifact_location=artifact_location(tracking_uri),
                                                tags=EXPERIMENT_TAGS))
        except MlflowException as exc:
            experiment = client.get_experiment_by_name(name)
            if exc.error_code != "RESOURCE_ALREADY_EXISTS" or experiment is None:
                raise
    for key, value in EXPERIMENT_TAGS.items():
        if experiment.tags.get(key) != value:
            client.set_experiment_tag(experiment.experiment_id, key, value)
    return str(experiment.experiment_id)


def dataset_input(entry: dict[str, Any]) -> Any:
    """A journal's "dataset" entry as MLflow's DatasetInput: named `<dataset>-<split>`, its profile the split and
    image count, tagged with MLflow's context (training, validation)."""
    import json

    from mlflow.entities import Dataset, DatasetInput, InputTag

    dataset = Dataset(name=f"{entry['name']}-{entry['split']}", digest=entry["digest"], source_type="local",
                      source=json.dumps({"uri": entry["source"]}),
                      profile=json.dumps({"split": entry["split"], "num_images": entry["images"]}))
    return DatasetInput(dataset, tags=[InputTag("mlflow.data.context", entry["context"])])


class MlflowSink(Sink):
    kind = "MLflow"

    def __init__(self, uri: str):
        self.uri = uri
        self.client = connect(uri)
        self._experiments: dict[str, str] = {}

    def prepare(self, experiment: str) -> None:
        self.experiment_id(experiment)

    def experiment_id(self, name: str) -> str:
        if name not in self._experiments:
            try:
                self._experiments[name] = ensure_experiment(self.client, name, self.uri)
            except Exception as exc:
                raise BenchError(f"cannot open MLflow tracking URI '{self.uri}': {first_line(exc)}") from None
        return self._experiments[name]

    def send(self, journal: Journal, entry: dict[str, Any], run_id: Optional[str]) -> Optional[str]:
        from mlflow.entities import Metric, Param, RunTag

        op = entry["op"]
        if op == "create":
            run = self.client.create_run(self.experiment_id(entry["experiment"]), run_name=entry["run_name"],
                                         tags=entry["tags"], start_time=entry["time"])
            return str(run.info.run_id)
        if op == "params":
            items = [Param(k, str(v)[:6000]) for k, v in sorted(entry["params"].items())]
            for i in range(0, len(items), _BATCH):
                self.client.log_batch(run_id, params=items[i: i + _BATCH])
        elif op == "tags":
            self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in entry["tags"].items()])
        elif op == "metrics":
            metrics = [Metric(k, v, entry["time"], entry["step"]) for k, v in entry["metrics"].items()]
            for i in range(0, len(metrics), 1000):
                self.client.log_batch(run_id, metrics=metrics[i: i + 1000])
        elif op == "dataset":
            self.client.log_inputs(run_id, datasets=[dataset_input(entry)])
        elif op == "artifact":
            local = journal.artifacts / entry["path"]
            folder = str(Path(entry["path"]).parent)
            self.client.log_artifact(run_id, str(local), None if folder == "." else folder)
        elif op == "status":
            if entry["status"] in TERMINAL:
                self.client.set_terminated(run_id, status=entry["status"], end_time=entry["time"])
            else:
                self.client.update_run(run_id, status=entry["status"])
        return run_id


# --- the backend (harness.tracking.backends): MLflow serves every URI no other backend claims --------------

STORE_TIMEOUT_S = 5.0  # how long `bench doctor` waits for a store's answer


def open_sink(uri: str) -> Sink:
    return MlflowSink(uri)


def read_run(uri: str, run_id: str) -> Optional[StoredRun]:
    client = connect(uri)
    try:
        run = client.get_run(run_id)
    except Exception:  # MLflow raises its own exception types for an unknown id
        return None
    return StoredRun(dict(run.data.tags), dict(run.data.params), dict(run.data.metrics))


def sqlite_path(uri: str) -> Path:
    return Path(uri.removeprefix("sqlite:///") if uri.startswith("sqlite:///") else uri.removeprefix("sqlite:"))


def check_store(uri: str, writers: int, reach: bool = True) -> StoreCheck:
    """A SQLite file readable and fit for one writer, a server answering /health (when it may be reached), a
    writable file store."""
    if uri.startswith("sqlite:"):
        path = sqlite_path(uri)
        if path.exists():
            try:
                with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=STORE_TIMEOUT_S) as db:
                    db.execute("select count(*) from sqlite_master").fetchone()
            except sqlite3.Error as exc:
                return StoreCheck(False, f"{uri}: unreadable ({exc})",
                                  "fix or move the file, or pass another --tracking-uri")
        elif not os.access(existing_parent(path.parent), os.W_OK):
            return StoreCheck(False, f"{uri}: {path.parent} is not writable",
                              "choose a writable place for the store, or pass another --tracking-uri")
        if writers > 1:
            return StoreCheck(False, f"{uri}: {writers} jobs writing at once, on several nodes maybe: one SQLite file "
                                     "cannot take their writes ('database is locked', a damaged store)",
                              "start a tracking server (`bench server --backend-store-uri postgresql://...`) and pass "
                              "the URI it prints with --tracking-uri")
        return StoreCheck(True, f"{uri}: a local SQLite file, fit for one writer")
    if uri.startswith(("http://", "https://")):
        if not reach:
            return StoreCheck(None, f"{uri}: a tracking server (not reached)")
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=STORE_TIMEOUT_S) as reply:
                ok = reply.status == 200
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            return StoreCheck(False, f"{uri}: unreachable ({reason})",
                              "start the tracking server, or pass --offline-tracking and `bench sync` later")
        if not ok:
            return StoreCheck(False, f"{uri}: /health did not answer 200", "check the server")
        return StoreCheck(True, f"{uri}: a tracking server, fit for {writers} concurrent writer(s)")
    if "://" not in uri or uri.startswith("file:"):
        return folder_store_check(uri, Path(uri.removeprefix("file://").removeprefix("file:")),
                                  "a file store (one folder per run)")
    return StoreCheck(None, f"{uri}: not checked (a store only MLflow itself can reach)")


def prepare_store(uri: str) -> None:
    """A tracking server must answer before jobs are queued for it; a new SQLite store gets its tables here, once
    (jobs starting together would race to create them)."""
    if uri.startswith(("http://", "https://")):
        import requests

        try:
            requests.get(uri.rstrip("/") + "/health", timeout=10).raise_for_status()
        except requests.RequestException as exc:
            reason = str(exc).splitlines()[0][:160]
            raise BenchError(f"tracking server {uri} does not answer ({reason}); start it with `bench server` (it "
                             "prints the URI to use), or fix --tracking-uri") from None
        return
    if not uri.startswith("sqlite:"):
        return
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient(uri).search_experiments(max_results=1)
    except Exception as exc:
        raise BenchError(f"cannot open MLflow tracking URI {uri!r} ({str(exc).splitlines()[0]}); fix "
                         "--tracking-uri") from None
