"""A run folder, runs/<dataset>/<row>/<stamp>/: its state (`run.json`) held in one object for the whole run,
written atomically on every change, and its checkpoints beside it.

run.json says which row and dataset, the tracked run and its store, the options the run was started with (so a bare
`--resume` needs nothing else), the process that trains it, and its status: running, finished, failed or
interrupted (or stopped behind, by `--stop-if-behind`). A run marked running whose process is gone reads as interrupted.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any, Optional

from harness.errors import BenchError
from harness.files import atomic_write_text

RUN_FILE = "run.json"
# A run's statuses as its tracking journal holds them (every tracking backend takes these words) and run.json's.
RUN_STATUS = {"RUNNING": "running", "FINISHED": "finished", "FAILED": "failed", "KILLED": "interrupted"}
# run.json's status of a run that `--stop-if-behind` ended early (MLflow's KILLED): resumable like an interrupted one.
STOPPED_BEHIND = "stopped behind"


def process_gone(info: dict[str, Any]) -> bool:
    """Whether the process recorded in run.json has ended (only knowable on the machine that ran it)."""
    pid, host = info.get("pid"), info.get("host")
    if not pid or host != socket.gethostname():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    # Alive: gone only if it is this very process, which is not training that run (an in-process caller).
    return int(pid) == os.getpid()


class RunFolder:
    def __init__(self, path: Path, info: dict[str, Any]):
        self.path, self.info = path, info

    @classmethod
    def create(cls, parent: Path, **info: Any) -> RunFolder:
        """A new, empty run folder under `parent`, named by the time, owned by this process."""
        path = parent / time.strftime("%Y%m%d-%H%M%S")
        while path.exists():
            path = path.with_name(path.name + "+")
        try:
            path.mkdir(parents=True)
        except OSError as exc:
            raise BenchError(f"cannot create run folder {path} ({exc.strerror or exc}); make {parent} "
                             "writable") from None
        folder = cls(path, {})
        folder.update(status=RUN_STATUS["RUNNING"], pid=os.getpid(), host=socket.gethostname(), **info)
        return folder

    @classmethod
    def open(cls, path: Path) -> RunFolder:
        try:
            return cls(path, json.loads((path / RUN_FILE).read_text()))
        except (OSError, json.JSONDecodeError):
            raise BenchError(f"{path} is not a segbench run folder (no readable {RUN_FILE})") from None

    @staticmethod
    def is_run_folder(path: Path) -> bool:
        return (path / RUN_FILE).is_file()

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def tracking_run_id(self) -> Optional[str]:
        """The id of the run's tracked run (run.json of older runs names it `mlflow_run_id`)."""
        run_id = self.info.get("tracking_run_id", self.info.get("mlflow_run_id"))
        return str(run_id) if run_id else None

    def update(self, **changes: Any) -> None:
        """Change the state and write run.json through a temporary file and a rename."""
        self.info = {**self.info, **changes}
        try:
            atomic_write_text(self.path / RUN_FILE, json.dumps(self.info, indent=2, sort_keys=True) + "\n")
        except OSError as exc:
            raise BenchError(f"cannot write {self.path / RUN_FILE} ({exc.strerror or exc}); free space or make "
                             f"{self.path} writable") from None

    def claim(self) -> None:
        """This process continues the run (a resume): it is running again, here."""
        self.update(status=RUN_STATUS["RUNNING"], pid=os.getpid(), host=socket.gethostname())

    @property
    def status(self) -> str:
        """run.json's status, where a run still marked running whose process is gone reads "interrupted"."""
        status = str(self.info.get("status", "unknown"))
        if status == RUN_STATUS["RUNNING"] and process_gone(self.info):
            return RUN_STATUS["KILLED"]
        return status

    def still_running(self) -> bool:
        """Known to be training now: marked running, by a live process of this machine other than this one."""
        info = self.info
        return (info.get("status") == RUN_STATUS["RUNNING"] and info.get("host") == socket.gethostname()
                and bool(info.get("pid")) and int(info["pid"]) != os.getpid() and not process_gone(info))

    def end(self, status: str) -> None:
        """Mark the run ended with `status`, one of the journal's (FINISHED, FAILED, KILLED)."""
        self.update(status=RUN_STATUS[status])


def latest(parent: Path, pattern: str = "*") -> Optional[Path]:
    """The newest run folder among `parent.glob(pattern)` (names are start times)."""
    folders = [p for p in parent.glob(pattern) if RunFolder.is_run_folder(p)]
    return max(folders, key=lambda p: (p.name, str(p.parent))) if folders else None


LATEST = "latest"  # stands for a row's newest run folder in a checkpoint path: runs/<dataset>/<row>/latest/...


def resolve_latest(path: Path) -> Path:
    """`runs/synthetic/df_seg_v1/latest/checkpoints/best.pt`: the newest run folder of that row in place of `latest`
    (the README's lines say it where a run folder's name is not known in advance); any other path unchanged."""
    parts = path.parts
    if LATEST not in parts or path.exists():
        return path
    at = parts.index(LATEST)
    parent = Path(*parts[:at]) if at else Path(".")
    newest = latest(parent)
    if newest is None:
        raise BenchError(f"{path}: no run folder under {parent} for `{LATEST}` to stand for; train one first "
                         f"(`bench run`), or give the run folder's name")
    return newest.joinpath(*parts[at + 1:])


def disk_usage(path: Path) -> int:
    """Bytes the files under `path` hold on disk, each file once however many names link to it (best.pt)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for file in path.rglob("*"):
        try:
            stat = file.lstat()
        except OSError:
            continue
        if file.is_file() and (stat.st_dev, stat.st_ino) not in seen:
            seen.add((stat.st_dev, stat.st_ino))
            total += stat.st_blocks * 512 if hasattr(stat, "st_blocks") else stat.st_size
    return total
