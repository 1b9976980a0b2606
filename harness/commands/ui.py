"""`bench ui`: MLflow's UI on the project's store, on loopback unless told, opened on the training runs table."""

from __future__ import annotations

from typing import Optional

from harness.tracking.mlflow_ui import serve_ui


def ui(dataset: str, tracking_uri: Optional[str], host: str, port: int) -> None:
    serve_ui(dataset, tracking_uri, host, port)
