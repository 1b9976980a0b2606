"""`bench server`: MLflow's tracking server, the store many jobs can share (SQLite for one machine, PostgreSQL for a
cluster), with artifacts in one folder the server serves (jobs only need HTTP to reach it).

Jobs on several nodes must not share one SQLite file (a network filesystem gives "database is locked" and corrupt
stores); they log to this server over HTTP, each through its own run folder's journal as always.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Optional
from urllib.parse import urlsplit, urlunsplit

from harness import paths
from harness.errors import BenchError
from harness.files import check_writable
from harness.tracking.mlflow_sink import server_environment
from harness.tracking.mlflow_ui import (
    STOP_SIGNALS,
    Stopped,
    check_port,
    check_stopped,
    owned_child_setup,
    stop_signals,
    wait_stoppable,
)

log = logging.getLogger(__name__)

SERVER_START_TIMEOUT_S = 300.0  # the app's import alone takes half a minute on a busy 2-core machine
STOP_TIMEOUT_S = 20.0
DATABASE_SCHEMES = ("sqlite", "postgresql", "postgres", "mysql", "mssql")
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def store_uri(uri: Optional[str]) -> str:
    """The backend store the server keeps runs in: `uri`, else the project's default store (./mlflow.db) when that
    is a database, so the server shows the runs already there. `postgresql://` is taken with psycopg2
    (`pip install 'segbench[cluster]'`), whichever driver SQLAlchemy would pick by default."""
    if uri is None:
        default = paths.default_tracking_uri()
        uri = default if default.split(":", 1)[0].split("+")[0] in DATABASE_SCHEMES else \
            f"sqlite:///{paths.PROJECT_ROOT / 'mlflow.db'}"
    scheme = uri.split(":", 1)[0] if ":" in uri else ""
    dialect, _, driver = scheme.partition("+")
    if dialect in ("http", "https"):
        raise BenchError(f"--backend-store-uri {uri}: that is a tracking server; give the database it should keep "
                         "runs in, e.g. postgresql://user@host/mlflow or sqlite:///path/mlflow.db")
    if dialect not in DATABASE_SCHEMES:
        raise BenchError(f"--backend-store-uri {uri!r}: give a database URI, e.g. postgresql://user@host/mlflow or "
                         "sqlite:///path/mlflow.db")
    if dialect in ("postgresql", "postgres") and driver in ("", "psycopg2"):
        try:
            import psycopg2  # noqa: F401
        except ImportError:
            raise BenchError(f"--backend-store-uri {uri}: PostgreSQL needs psycopg2; install it with "
                             "pip install 'segbench[cluster]'") from None
        uri = "postgresql+psycopg2:" + uri.split(":", 1)[1]
    return uri


def shown(uri: str) -> str:
    """`uri` without its password, for printing."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))


def check_store(uri: str) -> None:
    """Connect once before starting the server: a wrong database fails here in one line, not in its log."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import NoSuchModuleError, SQLAlchemyError

    if uri.startswith("sqlite:"):
        folder = Path(uri.split(":///", 1)[-1]).expanduser().parent
        if not folder.is_dir():
            raise BenchError(f"--backend-store-uri {uri}: folder {folder} does not exist; create it or choose another")
        return
    try:
        engine = create_engine(uri)
    except (ImportError, NoSuchModuleError) as exc:
        missing = getattr(exc, "name", None) or str(exc).splitlines()[0]
        raise BenchError(f"--backend-store-uri {shown(uri)}: its database driver is not installed ({missing}); "
                         "install it (pip install 'segbench[cluster]' for PostgreSQL's psycopg2), or give another "
                         "URI") from None
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        raise BenchError(f"cannot connect to --backend-store-uri {shown(uri)} ({reason}); check the database is "
                         "running and the URI's user, host and database") from None
    finally:
        engine.dispose()


def public_uri(host: str, port: int) -> str:
    """The URI jobs should use: the host as given, or this machine's name when listening on every interface."""
    name = socket.getfqdn() if host in ("0.0.0.0", "::", "") else host
    return f"http://{f'[{name}]' if ':' in name else name}:{port}"


def allowed_hosts(host: str) -> Optional[list[str]]:
    """Host headers the server accepts beyond MLflow's default (loopback and private addresses): this machine's
    names, which jobs on other nodes use. None on loopback."""
    if host in LOOPBACK:
        return None
    from mlflow.server.security_utils import get_default_allowed_hosts

    names = {socket.gethostname(), socket.getfqdn(), host} - {"0.0.0.0", "::", ""}
    return [*get_default_allowed_hosts(), *sorted(names), *sorted(f"{name}:*" for name in names)]


def start_server(backend_store_uri: Optional[str], artifacts: Optional[Path], host: str, port: int,
                 workers: int) -> tuple[subprocess.Popen, str, str, Path]:
    """Start `mlflow server` and wait until it answers: (process, URI for the jobs, store URI, artifacts folder).
    The server runs in its own process group, so that stopping it stops its workers too; whatever ends the wait (it
    exits, never answers, Ctrl-C, or SIGTERM/SIGHUP under `stop_signals`) ends the whole group."""
    import requests

    if workers < 1:
        raise BenchError(f"--workers {workers}: give 1 or more")
    check_port(host, port)
    uri = store_uri(backend_store_uri)
    check_store(uri)
    folder = (artifacts or paths.PROJECT_ROOT / "mlartifacts").expanduser().resolve()
    check_writable(folder, "--artifacts folder", "pass another --artifacts folder every node can read")
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--artifacts-destination",
               str(folder), "--serve-artifacts", "--host", host, "--port", str(port), "--workers", str(workers)]
    hosts = allowed_hosts(host)
    if hosts:
        command += ["--allowed-hosts", ",".join(hosts)]
    # A stop signal while the child starts would leave it running unowned: it waits, blocked, until `process` is
    # held and the try below can end it.
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        process = subprocess.Popen(command, env=server_environment(), stdout=sys.stderr, start_new_session=True,
                                   preexec_fn=owned_child_setup)
    except BaseException:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        raise
    try:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # a stop signal that came meanwhile is raised here
        local = f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else '[::1]' if host == '::' else host}:{port}"
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while time.monotonic() < deadline:
            check_stopped()
            if process.poll() is not None:
                raise BenchError(f"the MLflow server exited with code {process.returncode} before answering (its "
                                 "output above says why)")
            try:
                if requests.get(f"{local}/health", timeout=5).ok:
                    return process, public_uri(host, port), uri, folder
            except requests.RequestException:
                pass
            time.sleep(0.5)
        raise BenchError(f"the MLflow server did not answer on {host}:{port} within {SERVER_START_TIMEOUT_S:.0f} s")
    except BaseException:
        stop_server(process)
        raise


def stop_server(process: subprocess.Popen) -> None:
    """SIGTERM to the server's process group, SIGKILL to what is left after a grace period."""
    for sig, grace in ((signal.SIGTERM, STOP_TIMEOUT_S), (signal.SIGKILL, STOP_TIMEOUT_S)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            continue
        try:  # the group's other processes (its workers) go too
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return


def serve(backend_store_uri: Optional[str], artifacts: Optional[Path], host: str, port: int, workers: int,
          echo: Callable[[str], None] = print) -> int:
    """`bench server`: start the server, say which URI jobs should use, serve until Ctrl-C or SIGTERM; the exit code
    (0 after Ctrl-C, 128 + the signal's number after SIGTERM or SIGHUP). The server is ended on every way out."""
    with stop_signals():
        try:
            process, uri, store, folder = start_server(backend_store_uri, artifacts, host, port, workers)
        except Stopped as stop:
            echo(f"stopped ({stop}) before the MLflow server answered; it is ended")
            return 128 + stop.signum
        try:
            echo(f"MLflow tracking server: {uri} (store {shown(store)}, artifacts {folder})")
            echo(f"log jobs to it: bench sweep ... --tracking-uri {uri}   (or export MLFLOW_TRACKING_URI={uri})")
            echo("Ctrl-C stops it.")
            code = wait_stoppable(process)
            raise BenchError(f"the MLflow server exited with code {code}")
        except KeyboardInterrupt:
            return 0
        except Stopped as stop:
            return 128 + stop.signum
        finally:
            stop_server(process)
