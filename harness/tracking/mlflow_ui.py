"""`bench ui`: MLflow's UI on the project's store, opened on the training runs of the newest run's dataset.

The runs table opens on a saved view of MLflow 3's experiment page (an experiment tag
`mlflow.sharedViewState.<id>` holding `{name, createdAt, updatedAt, state}`, opened by `?viewStateShareKey=<id>`):
its state is the page's URL facets (filter, sort) and its UI state (the selected columns), so the headline, reference
and delta columns are shown and the table is sorted by the headline. MLflow reads a shared view only when the URL
holds no other facet. The run page's chart order cannot be set from outside (it lives in the browser's
localStorage); MLflow sorts its sections by metric prefix and puts ungrouped metrics last, which is why the
single-point summary metrics are ungrouped (`best_miou`, `final_miou`) and the curves (`train/`, `val/`) come first.

The server runs in its own process group, so a Ctrl-C at the terminal reaches `bench ui` alone, which then ends
the whole group (every worker) on SIGINT, SIGTERM, SIGHUP and on exit; the port is checked free before it starts.
"""

from __future__ import annotations

import atexit
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

from harness.config.benchmark import REFERENCE_DATASET
from harness.errors import BenchError
from harness.tracking.mlflow_sink import connect, ensure_experiment, server_environment
from harness.tracking.tracker import EXPERIMENT_PREFIX, HEADLINE, experiment_name

# MLflow's server took over 90 s to answer on a loaded 2-core machine: wait long, and say so while waiting.
UI_START_TIMEOUT_S = 300.0
PROGRESS_EVERY_S = 10.0
STOP_TIMEOUT_S = 15.0  # SIGTERM to the server's group, then SIGKILL
VIEW_TAG_PREFIX = "mlflow.sharedViewState."  # MLflow 3's saved views (experiment tags)
VIEW_ID = "segbench-training-runs"
VIEW_NAME = "segbench: training runs, best headline first"
TRAINING_RUNS = "tags.kind = 'train'"
SHOWN_COLUMNS = [*(f"metrics.`{name}`" for name in HEADLINE), "params.`iters`", "params.`batch_size`",
                 "tags.`row`"]


def check_port(host: str, port: int) -> None:
    """The port is a port and nothing listens on it: refused in one line before anything starts."""
    if not 1 <= port <= 65535:
        raise BenchError(f"--port {port}: give a port from 1 to 65535 (e.g. --port 5001)")
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds: TIME_WAIT is no obstacle
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise BenchError(f"--port {port}: something already listens on {host}:{port}; pass another port "
                                 f"(e.g. --port {port + 1}) or stop that server") from None
            if exc.errno == errno.EACCES:
                raise BenchError(f"--port {port}: ports below 1024 need root; pass a port above 1023") from None
            raise BenchError(f"--host {host} --port {port}: cannot listen there ({exc.strerror or exc}); pass "
                             "--host 127.0.0.1 or another port") from None


def newest_training_dataset(client: Any) -> Optional[str]:
    """The dataset of the newest training run in any segbench experiment (None when there is none)."""
    experiments = client.search_experiments(filter_string=f"name LIKE '{EXPERIMENT_PREFIX}-%'")
    if not experiments:
        return None
    runs = client.search_runs([e.experiment_id for e in experiments], TRAINING_RUNS,
                              order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        return None
    names = {e.experiment_id: e.name for e in experiments}
    return runs[0].data.tags.get("dataset") or names[runs[0].info.experiment_id][len(EXPERIMENT_PREFIX) + 1:]


def training_view_state() -> dict[str, Any]:
    """The saved view's state: training runs only, best headline first, the headline, reference and delta shown."""
    return {"searchFilter": TRAINING_RUNS, "orderByKey": f"metrics.`{HEADLINE[0]}`", "orderByAsc": False,
            "selectedColumns": SHOWN_COLUMNS}


def save_training_view(client: Any, experiment_id: str) -> str:
    """Write (or refresh) the saved view on the experiment; returns its share key."""
    now = int(time.time() * 1000)
    key = VIEW_TAG_PREFIX + VIEW_ID
    experiment = client.get_experiment(experiment_id)
    state = json.dumps(training_view_state(), sort_keys=True)
    try:
        created = json.loads(experiment.tags.get(key, "")).get("createdAt", now)
    except (ValueError, AttributeError):
        created = now
    envelope = {"name": VIEW_NAME, "createdAt": created, "updatedAt": now, "state": state}
    if experiment.tags.get(key) is None or json.loads(experiment.tags[key]).get("state") != state:
        client.set_experiment_tag(experiment_id, key, json.dumps(envelope))
    return VIEW_ID


# MLflow 3.17's UI picks GenAI or model training from `workflowType` (the URL's, else the browser's last choice,
# GenAI by default), not from the experiment's `mlflow.experimentKind` tag: the URL names model training.
WORKFLOW_TYPE = "machine_learning"


def runs_table_url(host: str, port: int, experiment_id: str, view: str) -> str:
    """The experiment's runs table on the saved view, in MLflow 3's model-training view (not its GenAI one).

    MLflow shows a "You're viewing a shared view ... Override saved view" banner whenever a shared view is open,
    and a view's columns can only come from a shared view or the browser's own storage: without the view, the
    runs table opens without the headline column. The banner stays (Esc or its close button dismisses it)."""
    from urllib.parse import quote

    return (f"http://{host}:{port}/#/experiments/{experiment_id}/runs?viewStateShareKey={quote(view)}"
            f"&workflowType={WORKFLOW_TYPE}")


def _last_line(log: Path) -> str:
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1][:200] if lines else ""


def die_with_parent() -> None:
    """In the server's process (Linux): SIGTERM when `bench ui` dies, even by SIGKILL."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}


def owned_child_setup() -> None:
    """In a child started with the stop signals blocked (so that its parent always holds it when a signal comes):
    take them again, and die with the parent on Linux."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    if sys.platform.startswith("linux"):
        die_with_parent()


class UiServer:
    """`mlflow ui` in its own process group, its output in a log file; `stop` ends every process of the group."""

    def __init__(self, tracking_uri: str, host: str, port: int, workers: int):
        handle, log = tempfile.mkstemp(prefix="segbench-mlflow-ui-", suffix=".log")
        self.log = Path(log)
        self.host, self.port = host, port
        with os.fdopen(handle, "wb") as output:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", tracking_uri, "--host", host,
                 "--port", str(port), "--workers", str(workers)],
                # Without MLflow's GenAI job runner (a dozen huey processes a runs table does not use).
                env=server_environment(),
                stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
                preexec_fn=die_with_parent if sys.platform.startswith("linux") else None)
        self.group = self.process.pid  # start_new_session: the server leads its own group
        atexit.register(self.stop)

    def wait_ready(self, echo: Callable[[str], None], timeout: Optional[float] = None) -> None:
        """Return once the server answers; one line (and the server ended) when it exits or never answers."""
        import requests

        timeout = UI_START_TIMEOUT_S if timeout is None else timeout
        started = time.monotonic()
        said = started
        while time.monotonic() - started < timeout:
            if self.process.poll() is not None:
                reason = _last_line(self.log) or "no output"
                self.stop()
                raise BenchError(f"the MLflow UI exited with code {self.process.returncode} before answering on "
                                 f"{self.host}:{self.port}: {reason}")
            try:
                if requests.get(f"http://{self.host}:{self.port}/health", timeout=2).ok:
                    return
            except requests.RequestException:
                pass
            if time.monotonic() - said >= PROGRESS_EVERY_S:
                said = time.monotonic()
                echo(f"waiting for the MLflow UI on {self.host}:{self.port} ({said - started:.0f} s; a busy machine "
                     f"takes a while, up to {timeout:.0f} s)")
            time.sleep(0.5)
            check_stopped()
        self.stop()
        raise BenchError(f"the MLflow UI did not answer on {self.host}:{self.port} within {timeout:.0f} s (the "
                         "machine may be overloaded); try again when it is quieter")

    def alive(self) -> bool:
        try:
            os.killpg(self.group, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def stop(self) -> None:
        """SIGTERM to the whole group, SIGKILL to what is left after STOP_TIMEOUT_S; then the log is removed."""
        atexit.unregister(self.stop)
        for sig, wait in ((signal.SIGTERM, STOP_TIMEOUT_S), (signal.SIGKILL, 5.0)):
            if not self.alive():
                break
            try:
                os.killpg(self.group, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                self.process.poll()  # reap the leader so that the group can end
                if not self.alive():
                    break
                time.sleep(0.1)
        self.process.poll()
        self.log.unlink(missing_ok=True)


class Stopped(Exception):
    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_RECEIVED: list[int] = []  # the signals handled under stop_signals, newest last


@contextmanager
def stop_signals() -> Iterator[None]:
    """SIGTERM and SIGHUP raise `Stopped` and SIGINT KeyboardInterrupt, so that the block's cleanup runs on any of
    them. Python drops an exception a handler raises while the interpreter runs an at-fork callback (logging's, in
    the parent, as subprocess starts a child): the block's waits call `check_stopped`, which raises it again."""
    def handler(signum: int, frame: Any) -> None:
        _RECEIVED.append(signum)
        check_stopped()

    _RECEIVED.clear()
    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        _RECEIVED.clear()


def check_stopped() -> None:
    """Raise what the newest signal under `stop_signals` means (nothing when none came)."""
    if _RECEIVED:
        if _RECEIVED[-1] == signal.SIGINT:
            raise KeyboardInterrupt
        raise Stopped(_RECEIVED[-1])


def wait_stoppable(process: subprocess.Popen) -> int:
    """The process's exit code, looking for a signal under `stop_signals` twice a second meanwhile."""
    while True:
        check_stopped()
        try:
            return process.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
            continue


def open_view(dataset: Optional[str], tracking_uri: str) -> tuple[str, str, str]:
    """(dataset, experiment id, saved view key): the asked dataset, else the newest training run's."""
    client = connect(tracking_uri)
    chosen = dataset or newest_training_dataset(client) or REFERENCE_DATASET
    experiment_id = ensure_experiment(client, experiment_name(chosen), tracking_uri)
    return chosen, experiment_id, save_training_view(client, experiment_id)


def serve_ui(dataset: Optional[str], tracking_uri: Optional[str], host: str = "127.0.0.1", port: int = 5000,
             echo: Callable[[str], None] = print, workers: int = 1) -> int:
    """`bench ui`: serve until Ctrl-C or SIGTERM, after printing where the training runs are; the exit code.
    One user browsing needs one worker; MLflow's default of 4 takes half a minute to start on a small machine."""
    from harness.paths import default_tracking_uri

    check_port(host, port)
    uri = tracking_uri or default_tracking_uri()
    chosen, experiment_id, view = open_view(dataset, uri)
    with stop_signals():
        server = UiServer(uri, host, port, workers)
        try:
            server.wait_ready(echo)
            echo(f"MLflow UI ({experiment_name(chosen)}, training runs, best mIoU first): "
                 f"{runs_table_url(host, port, experiment_id, view)}\nCtrl-C stops it.")
            wait_stoppable(server.process)
            raise BenchError(f"the MLflow UI stopped by itself (exit code {server.process.returncode}): "
                             f"{_last_line(server.log) or 'no output'}")
        except KeyboardInterrupt:
            echo("stopped the MLflow UI")
            return 0
        except Stopped as stop:
            echo(f"stopped the MLflow UI ({stop})")
            return 128 + stop.signum
        finally:
            server.stop()
