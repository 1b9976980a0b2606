"""`bench ui`: MLflow's UI on the project's store, opened on the training runs table."""

from __future__ import annotations

import sys
import time
from typing import Optional

from harness.errors import BenchError
from harness.tracking.mlflow_sink import connect, ensure_experiment
from harness.tracking.tracker import experiment_name

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
