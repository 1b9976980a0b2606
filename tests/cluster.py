"""Real services for the cluster tests, started on this machine and stopped at the end: a one-node Slurm cluster
(munged, slurmctld, slurmd from Debian's slurm-wlm and munge), a throw-away PostgreSQL cluster (Debian's
postgresql), and `bench server` on it. Everything listens on 127.0.0.1 or a Unix socket only.

A service whose programs are missing skips its tests with the reason (a user's machine may lack them); in CI, whose
.ci/run installs them, a missing program fails instead. A service that cannot run here skips with its own error.
"""

from __future__ import annotations

import glob
import os
import pwd
import queue
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.paths import PROJECT_ROOT

SLURM_PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "squeue", "scontrol", "scancel", "sinfo")


def unavailable(what: str, install: str) -> None:
    message = f"{what} (install with: apt-get install {install})"
    if os.environ.get("CI"):
        pytest.fail(f"{message}; .ci/run installs it")
    pytest.skip(message)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def free_port_range(size: int) -> tuple[int, int]:
    """`size` consecutive ports free on 127.0.0.1 (srun listens on some of them)."""
    for _ in range(50):
        base = random.randrange(30000, 60000 - size)
        try:
            for port in range(base, base + size):
                with socket.socket() as probe:
                    probe.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base, base + size - 1
    raise RuntimeError("no free port range on 127.0.0.1")


def stop(process: subprocess.Popen, timeout: float = 20.0) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_until(condition, timeout: float, what: str, alive: tuple[subprocess.Popen, ...] = ()):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        for process in alive:
            if process.poll() is not None:
                return None
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def tail(path: Path, lines: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return "(no log)"


# --- Slurm ------------------------------------------------------------------------------------------------


class SlurmCluster:
    """One node, `localhost`, with this machine's cores; the clients find it through SLURM_CONF."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.conf = folder / "slurm.conf"
        self.processes: list[subprocess.Popen] = []
        self.cpus = len(os.sched_getaffinity(0))

    def write_conf(self) -> None:
        ctld, slurmd = free_port(), free_port()
        low, high = free_port_range(40)
        f = self.folder
        self.conf.write_text(textwrap.dedent(f"""\
            ClusterName=segbench-test
            SlurmctldHost=localhost(127.0.0.1)
            SlurmctldPort={ctld}
            SlurmdPort={slurmd}
            SrunPortRange={low}-{high}
            # Bind 127.0.0.1, the address the node's name resolves to, never every interface.
            CommunicationParameters=NoInAddrAny,NoCtldInAddrAny
            AuthType=auth/munge
            CredType=cred/munge
            # cred_expire also delays a requeued job's restart (120 s by default).
            AuthInfo=socket={f / 'munge' / 'munge.sock'},cred_expire=10
            SlurmUser=root
            SlurmdUser=root
            StateSaveLocation={f / 'state'}
            SlurmdSpoolDir={f / 'spool'}
            SlurmctldPidFile={f / 'slurmctld.pid'}
            SlurmdPidFile={f / 'slurmd.pid'}
            SlurmctldLogFile={f / 'slurmctld.log'}
            SlurmdLogFile={f / 'slurmd.log'}
            ProctrackType=proctrack/linuxproc
            TaskPlugin=task/none
            JobAcctGatherType=jobacct_gather/none
            AccountingStorageType=accounting_storage/none
            MpiDefault=none
            SchedulerType=sched/builtin
            SelectType=select/cons_tres
            SelectTypeParameters=CR_Core
            SlurmdParameters=config_overrides
            ReturnToService=2
            KillWait=30
            MinJobAge=600
            InactiveLimit=0
            NodeName=localhost NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory=1000 State=UNKNOWN
            PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
            """))

    def start(self) -> None:
        f = self.folder
        for sub in ("munge", "state", "spool"):
            (f / sub).mkdir(mode=0o700)
        key = f / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self.write_conf()
        munge = f / "munge"
        self.processes.append(subprocess.Popen(
            ["munged", "--foreground", "--force", f"--socket={munge / 'munge.sock'}", f"--key-file={key}",
             f"--log-file={munge / 'munged.log'}", f"--pid-file={munge / 'munged.pid'}",
             f"--seed-file={munge / 'seed'}"],
            stdout=subprocess.DEVNULL, stderr=open(munge / "munged.out", "w")))
        if not wait_until(lambda: (munge / "munge.sock").exists(), 30, "munged", tuple(self.processes)):
            pytest.skip(f"munged cannot run here: {tail(munge / 'munged.out')}")
        env = self.env()
        for name, argv in (("slurmctld", ["slurmctld", "-D", "-c", "-f", str(self.conf)]),
                           ("slurmd", ["slurmd", "-D", "-f", str(self.conf), "-N", "localhost"])):
            self.processes.append(subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL,
                                                   stderr=open(f / f"{name}.out", "w")))
        if not wait_until(self.node_idle, 90, "the Slurm node", tuple(self.processes)):
            which = next(n for n, p in zip(("munged", "slurmctld", "slurmd"), self.processes) if p.poll() is not None)
            pytest.skip(f"{which} cannot run here: {tail(f / f'{which}.out')} {tail(f / f'{which}.log')}")

    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def run(self, *argv: str) -> str:
        return subprocess.run(argv, env=self.env(), capture_output=True, text=True, timeout=60).stdout

    def node_idle(self) -> bool:
        return self.run("sinfo", "--noheader", "--nodes=localhost", "--format=%T").strip() == "idle"

    def stop(self) -> None:
        """Cancel every job, wait for the node to have no job process left, then stop the daemons."""
        if self.processes and self.processes[-1].poll() is None:
            self.run("scancel", "--user", pwd.getpwuid(os.getuid()).pw_name)
            try:
                wait_until(lambda: not self.run("squeue", "--noheader").strip()
                           and not self.run("scontrol", "listpids").strip().splitlines()[1:], 90,
                           "the Slurm jobs to end")
            except AssertionError:
                pass
        for process in reversed(self.processes):
            stop(process)


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    missing = [p for p in SLURM_PROGRAMS if shutil.which(p) is None]
    if missing:
        unavailable(f"Slurm is not installed (no {', '.join(missing)})", "slurm-wlm munge")
    if os.geteuid() != 0:
        pytest.skip("the one-node Slurm cluster runs slurmd, which starts jobs as their user: needs root")
    folder = Path(tempfile.mkdtemp(prefix="segbench-slurm-"))
    cluster = SlurmCluster(folder)
    saved = os.environ.get("SLURM_CONF")
    try:
        cluster.start()
        os.environ["SLURM_CONF"] = str(cluster.conf)
        yield cluster
    finally:
        cluster.stop()
        if saved is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = saved
        shutil.rmtree(folder, ignore_errors=True)


# --- PostgreSQL and bench server ----------------------------------------------------------------------------


def postgres_bin() -> Path:
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(Path(p).parts[4]))
    if not versions:
        unavailable("PostgreSQL is not installed (no pg_ctl)", "postgresql")
    return Path(versions[-1]).parent


@pytest.fixture(scope="session")
def postgres_uri() -> Iterator[str]:
    """A PostgreSQL cluster of its own, listening on a Unix socket in its folder only; its database `mlflow`."""
    binaries = postgres_bin()
    folder = Path(tempfile.mkdtemp(prefix="segbench-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb refuses root: the package's own user runs the cluster
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root, and there is no postgres user to run PostgreSQL as")
        os.chown(folder, owner.pw_uid, owner.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    data, log = folder / "data", folder / "server.log"

    def pg(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([*as_user, *argv], capture_output=True, text=True, timeout=120, cwd=folder)

    try:
        done = pg(str(binaries / "initdb"), "-D", str(data), "--auth=trust", "--username=postgres", "-E", "UTF8",
                  "--no-sync")
        if done.returncode:
            pytest.skip(f"initdb cannot run here: {done.stderr.strip().splitlines()[-1:]}")
        options = f"-c listen_addresses='' -k {folder} -c fsync=off -c full_page_writes=off"
        done = pg(str(binaries / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-o", options, "start")
        if done.returncode:
            pytest.skip(f"PostgreSQL cannot start here: {tail(log)}")
        try:
            done = pg(str(binaries / "createdb"), "-h", str(folder), "-U", "postgres", "mlflow")
            assert done.returncode == 0, done.stderr
            yield f"postgresql://postgres@/mlflow?host={folder}"
        finally:
            pg(str(binaries / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


class BenchServer:
    def __init__(self, process: subprocess.Popen, uri: str, output: list[str]):
        self.process, self.uri, self.output = process, uri, output


def start_bench_server(*args: str, timeout: float = 300.0) -> BenchServer:
    """`bench server ARGS` in the background, once it printed the URI jobs should use."""
    process = subprocess.Popen([sys.executable, "-m", "harness.cli", "server", *args], cwd=PROJECT_ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue = queue.Queue()
    output: list[str] = []

    def read() -> None:
        for line in process.stdout:  # type: ignore[union-attr]
            output.append(line)
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            continue
        if line is None:
            break
        if line.startswith("MLflow tracking server: "):
            return BenchServer(process, line.split()[3], output)
    stop_bench_server(process)
    raise AssertionError("bench server did not start:\n" + "".join(output))


def stop_bench_server(process: subprocess.Popen) -> None:
    """What Ctrl-C or a service manager does: SIGTERM; bench server stops its MLflow server's processes."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="session")
def tracking_server(postgres_uri: str) -> Iterator[BenchServer]:
    """`bench server` on the PostgreSQL cluster, on a free port of 127.0.0.1."""
    artifacts = Path(tempfile.mkdtemp(prefix="segbench-artifacts-"))
    server = start_bench_server("--backend-store-uri", postgres_uri, "--artifacts", str(artifacts),
                                "--port", str(free_port()), "--workers", "1")
    try:
        yield server
    finally:
        stop_bench_server(server.process)
        shutil.rmtree(artifacts, ignore_errors=True)
