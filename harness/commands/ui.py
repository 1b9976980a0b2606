"""`bench ui`: MLflow's UI on the project's store, on loopback unless told, opened on the training runs table of the
newest run's dataset (or --dataset's)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

from harness.tracking.mlflow_ui import serve_ui


def ui(dataset: Optional[str], tracking_uri: Optional[str], host: str, port: int,
       echo: Callable[[str], None] = print) -> int:
    return serve_ui(dataset, tracking_uri, host, port, echo=echo)
