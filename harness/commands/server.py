"""`bench server`: MLflow's tracking server on a database many jobs can share; prints the URI jobs should use."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Optional

from harness.tracking.mlflow_server import serve


def server(backend_store_uri: Optional[str], artifacts: Optional[Path], host: str, port: int, workers: int,
           echo: Callable[[str], None] = print) -> int:
    return serve(backend_store_uri, artifacts, host, port, workers, echo)
