"""The TensorBoard sink (opt-in: `--tracking-uri tensorboard:DIR`): each run's journal as TensorBoard event files
under DIR/<experiment>/<run name>/<run folder>, read by `tensorboard --logdir DIR`.

Metrics become scalars at their iteration, params and tags a text table, PNG artifacts images, other artifacts
files beside the events, and the status a text entry. Needs the `tensorboard` package (`pip install
'segbench[tensorboard]'`).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any, Optional

from harness.errors import BenchError
from harness.tracking.backends import StoreCheck, folder_store_check
from harness.tracking.journal import Journal
from harness.tracking.sink import TERMINAL, Sink

SCHEME = "tensorboard:"


def log_root(uri: str) -> Path:
    """DIR of `tensorboard:DIR` (also `tensorboard://DIR`)."""
    path = uri[len(SCHEME):]
    path = path[2:] if path.startswith("//") else path
    if not path:
        raise BenchError(f"tracking URI {uri!r} names no folder; give tensorboard:DIR, e.g. tensorboard:./tensorboard")
    return Path(path).expanduser().resolve()


def _table(values: dict[str, Any]) -> str:
    rows = "\n".join(f"| {key} | {str(value).replace('|', '/')} |" for key, value in sorted(values.items()))
    return "| key | value |\n|---|---|\n" + rows


class TensorBoardSink(Sink):
    kind = "TensorBoard"

    def __init__(self, uri: str):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise BenchError("--tracking-uri tensorboard:... needs the tensorboard package; install it with "
                             "pip install 'segbench[tensorboard]'") from None
        self._writer_class = SummaryWriter
        self.uri, self.root = uri, log_root(uri)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BenchError(f"cannot create the TensorBoard folder {self.root} ({exc.strerror or exc}); "
                             "choose another tensorboard:DIR") from None
        self._writers: dict[str, Any] = {}

    def _writer(self, run_id: str) -> Any:
        if run_id not in self._writers:
            self._writers[run_id] = self._writer_class(log_dir=str(self.root / run_id))
        return self._writers[run_id]

    def send(self, journal: Journal, entry: dict[str, Any], run_id: Optional[str]) -> Optional[str]:
        op = entry["op"]
        if op == "create":
            name = re.sub(r"[^A-Za-z0-9_.-]+", "_", entry["run_name"]).strip("_") or "run"
            run_id = f"{entry['experiment']}/{name}/{journal.folder.parent.name}"
            self._writer(run_id).add_text("tags", _table(entry["tags"]), 0, walltime=entry["time"] / 1000)
            self._writer(run_id).flush()
            return run_id
        assert run_id is not None
        writer = self._writer(run_id)
        if op == "params":
            writer.add_text("params", _table(entry["params"]), 0)
        elif op == "tags":
            writer.add_text("tags", _table(entry["tags"]), 0)
        elif op == "metrics":
            for key, value in entry["metrics"].items():
                writer.add_scalar(key, value, entry["step"], walltime=entry["time"] / 1000)
        elif op == "dataset":
            writer.add_text(f"datasets/{entry['split']}", _table({k: entry[k] for k in ("name", "split", "images",
                                                                                      "digest", "source")}), 0)
        elif op == "artifact":
            local = journal.artifacts / entry["path"]
            if local.suffix == ".png":
                import numpy as np
                from PIL import Image

                with Image.open(local) as image:
                    writer.add_image(entry["path"], np.asarray(image.convert("RGB")), 0, dataformats="HWC")
            target = self.root / run_id / "artifacts" / entry["path"]
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(local, target)
        elif op == "status":
            writer.add_text("status", entry["status"], 0, walltime=entry["time"] / 1000)
        writer.flush()
        if op == "status" and entry["status"] in TERMINAL:
            writer.close()
            del self._writers[run_id]
        return run_id

    def close(self) -> None:
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()


# --- the backend (harness.tracking.backends, scheme "tensorboard") ---------------------------------


def open_sink(uri: str) -> Sink:
    return TensorBoardSink(uri)


def check_store(uri: str, writers: int, reach: bool = True) -> StoreCheck:
    return folder_store_check(uri, log_root(uri), "event files under a writable folder, one folder per run")
