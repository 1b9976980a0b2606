"""The MLflow sink: one experiment per dataset, one run per training or evaluation, with short, bounded HTTP
timeouts so that a dead store is noticed in seconds. MLflow's own async logging is not used: it retries for minutes
and keeps nothing to replay."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

from harness.errors import BenchError
from harness.tracking.journal import Journal
from harness.tracking.sink import TERMINAL, Sink, first_line

_BATCH = 100  # MLflow's log_batch accepts at most this many params per call
PROBE_TIMEOUT_S = 3.0
# MLflow's own defaults retry a dead server for about four minutes per call; a run must notice within seconds.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "5", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
                 "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.1"}
# The experiment opens on its runs table, not on MLflow 3's GenAI overview.
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}
# MLflow's own source fields, which its UI shows on the run page.
SOURCE_NAME, SOURCE_TYPE, GIT_COMMIT = "mlflow.source.name", "mlflow.source.type", "mlflow.source.git.commit"


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


def source_tags(commit: str, entry_point: str) -> dict[str, str]:
    """The commit and entry point in MLflow's source fields (other sinks keep them as plain tags)."""
    sha, dirty = (commit[:-len("-dirty")], True) if commit.endswith("-dirty") else (commit, False)
    tags = {SOURCE_NAME: entry_point, SOURCE_TYPE: "LOCAL", "git_dirty": str(dirty).lower()}
    if sha != "unknown":
        tags[GIT_COMMIT] = sha
    return tags


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
