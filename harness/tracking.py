"""MLflow tracking through its client API: one experiment per dataset, one run per training, named by row."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

from harness.errors import BenchError

EXPERIMENT_PREFIX = "segbench"
_BATCH = 100  # MLflow's log_batch accepts at most this many params per call


def experiment_name(dataset: str) -> str:
    return f"{EXPERIMENT_PREFIX}-{dataset}"


def _artifact_location(tracking_uri: str) -> Optional[str]:
    """Artifacts beside a local SQLite store, instead of MLflow's default of ./mlruns in the working directory."""
    if tracking_uri.startswith("sqlite:///"):
        return (Path(tracking_uri[len("sqlite:///"):]).resolve().parent / "mlartifacts").as_uri()
    return None


class Tracker:
    def __init__(self, tracking_uri: str, dataset: str):
        from mlflow.tracking import MlflowClient  # mlflow imports slowly; only runs need it

        self.tracking_uri = tracking_uri
        try:
            self.client = MlflowClient(tracking_uri=tracking_uri)
            name = experiment_name(dataset)
            experiment = self.client.get_experiment_by_name(name)
            self.experiment_id = (
                experiment.experiment_id if experiment
                else self.client.create_experiment(name, artifact_location=_artifact_location(tracking_uri))
            )
        except Exception as exc:  # MLflow raises many types for a bad URI or an unreadable store
            raise BenchError(f"cannot open MLflow tracking URI '{tracking_uri}': {str(exc).splitlines()[0]}") from None
        self.run_id: Optional[str] = None

    def start(self, run_name: str, params: dict[str, Any], tags: dict[str, str]) -> str:
        from mlflow.entities import Param, RunTag

        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags)
        self.run_id = run.info.run_id
        items = [Param(k, str(v)) for k, v in sorted(params.items())]
        for i in range(0, len(items), _BATCH):
            self.client.log_batch(self.run_id, params=items[i : i + _BATCH])
        self.client.log_batch(self.run_id, tags=[RunTag("mlflow.runName", run_name)])
        return self.run_id

    def reopen(self, run_id: str) -> None:
        """Continue a resumed training in its own MLflow run."""
        self.run_id = run_id
        self.client.update_run(run_id, status="RUNNING")

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric
        import time

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None and not math.isnan(v)]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def set_tag(self, key: str, value: str) -> None:
        self.client.set_tag(self.run_id, key, value)

    def finish(self, status: str = "FINISHED") -> None:
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, status=status)
