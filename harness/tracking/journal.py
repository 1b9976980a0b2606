"""A run's journal: everything it logged, in order, in its run folder (`tracking/journal.jsonl`, artifacts copied
beside it), and which entries each store acknowledged (`tracking/sent.jsonl`, one line per entry and store).

The journal is the run's tracking record; a store (MLflow, TensorBoard) is a copy of it. Sending to a store is
replaying the entries that store has not acknowledged, so a store that was down, or a second store, can be brought
up to date at any time (`bench sync`).
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from harness.config.curves import TRAIN, grouped

JOURNAL_DIR = "tracking"
JOURNAL_FILE = "journal.jsonl"
SENT_FILE = "sent.jsonl"
CUT_SEQ = re.compile(r'\{"seq": (\d+)')  # the start of an entry as `append` writes it

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DamagedLine:
    """A journal line that is not a JSON object: cut short by a crash, or edited."""

    path: Path
    number: int  # 1-based
    text: str

    def describe(self) -> str:
        shown = self.text if len(self.text) <= 60 else self.text[:57] + "..."
        return f"{self.path}, line {self.number}: {shown!r}"


class Journal:
    """What a run logged and which store acknowledged what. Only rank 0's main thread appends; only a sender
    acknowledges."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / JOURNAL_FILE
        self.sent_path = self.folder / SENT_FILE
        self.artifacts = self.folder / "artifacts"
        self._lock = threading.Lock()
        entries, damaged = self._read(self.path)
        # After the last sequence number written, even one whose line a crash cut short: no number means two entries.
        cut = [int(m.group(1)) for d in damaged if (m := CUT_SEQ.match(d.text))]
        self._next = max([e["seq"] for e in entries] + cut, default=-1) + 1
        self._tails_checked: set[Path] = set()

    @staticmethod
    def exists(folder: Path) -> bool:
        return (Path(folder) / JOURNAL_FILE).is_file()

    def append(self, entry: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            entry = {"seq": self._next, **entry}
            self._next += 1
            with self.path.open("a") as f:
                self._terminate_cut_line(self.path, f)
                f.write(json.dumps(entry, allow_nan=False) + "\n")
        return entry

    def _terminate_cut_line(self, path: Path, f: Any) -> None:
        """A last line without its newline (a crash cut it short) is ended before the first new line, which would
        otherwise be glued onto it and lost with it; the cut line stays, named, for `bench sync` to report. Only a
        writer does this, on its first append to `path`: a reader never changes a file another process may write."""
        if path in self._tails_checked:
            return
        self._tails_checked.add(path)
        with path.open("rb") as raw:
            size = raw.seek(0, 2)
            if not size:
                return
            raw.seek(size - 1)
            if raw.read(1) == b"\n":
                return
        f.write("\n")
        f.flush()
        number = len(path.read_bytes().splitlines())
        after = f"new entries continue after it from sequence {self._next - 1}" if path == self.path else \
            "the entries it acknowledged are sent again"
        log.warning("warning: %s, line %d was cut short (a crash while writing it); it is kept as a damaged line and "
                    "%s", path, number, after)

    def acknowledge(self, entry: dict[str, Any], store: str, **extra: Any) -> None:
        with self._lock:
            with self.sent_path.open("a") as f:
                self._terminate_cut_line(self.sent_path, f)
                f.write(json.dumps({"seq": entry["seq"], "store": store, **extra}) + "\n")

    @staticmethod
    def _read(path: Path) -> tuple[list[dict[str, Any]], list[DamagedLine]]:
        if not path.is_file():
            return [], []
        lines, damaged = [], []
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                value = None
            if isinstance(value, dict) and isinstance(value.get("seq"), int):
                lines.append(value)
            else:
                damaged.append(DamagedLine(path, number, line))
        return lines, damaged

    def entries(self) -> list[dict[str, Any]]:
        return self._read(self.path)[0]

    def damaged(self) -> list[DamagedLine]:
        """Lines of the journal that hold no entry; replaying cannot send them."""
        return self._read(self.path)[1]

    def header(self) -> dict[str, Any]:
        return next((e for e in self.entries() if e.get("op") == "create"), {})

    def _acknowledgements(self, store: str) -> dict[int, dict[str, Any]]:
        # Lines written before acknowledgements named their store belong to the store the run was created on.
        own = self.header().get("tracking_uri")
        acks = self._read(self.sent_path)[0]
        return {a["seq"]: a for a in acks if a.get("store", own) == store}

    def pending(self, store: str) -> list[dict[str, Any]]:
        """Entries `store` has not acknowledged, in order."""
        sent = self._acknowledgements(store)
        return [e for e in self.entries() if e["seq"] not in sent]

    def run_id(self, store: str) -> Optional[str]:
        """The id `store` gave this run, once it acknowledged the run's creation."""
        return next((a["run_id"] for a in self._acknowledgements(store).values() if a.get("run_id")), None)

    def tracking_uri(self) -> Optional[str]:
        """The store the run was created for."""
        uri = self.header().get("tracking_uri")
        return str(uri) if uri else None

    def params(self) -> dict[str, Any]:
        """The params the run logged at its start ({} before they were journalled)."""
        return next((dict(e["params"]) for e in self.entries() if e.get("op") == "params"), {})

    def training_step(self) -> Optional[int]:
        """The newest step at which the run logged a training metric (None before the first)."""
        steps = [int(e["step"]) for e in self.entries()
                 if e.get("op") == "metrics" and any(k.startswith(grouped(TRAIN, "")) for k in e["metrics"])]
        return max(steps) if steps else None

    def end(self, status: str, time_ms: int) -> None:
        """Journal the run's end (`status`: one of harness.tracking.sink.TERMINAL) for the stores to replay."""
        self.append({"op": "status", "status": status, "time": time_ms})

    def metric_history(self) -> dict[str, list[tuple[int, float]]]:
        """Every metric the run logged (sent or not), key -> [(step, value)], for the curves image."""
        history: dict[str, list[tuple[int, float]]] = {}
        for entry in self.entries():
            if entry.get("op") == "metrics":
                for key, value in entry["metrics"].items():
                    history.setdefault(key, []).append((entry["step"], value))
        return history


def describe_pending(entries: Iterable[dict[str, Any]]) -> str:
    """'12 metric values (train/loss, val/miou_raw), 2 artifacts (plots/curves.png, ...), the status FINISHED'."""
    values, keys, artifacts, other, status = 0, [], [], 0, None
    for entry in entries:
        if entry["op"] == "metrics":
            values += len(entry["metrics"])
            keys += [k for k in entry["metrics"] if k not in keys]
        elif entry["op"] == "artifact":
            artifacts.append(entry["path"])
        elif entry["op"] == "status":
            status = entry["status"]
        else:
            other += 1
    parts = []
    if other:
        parts.append(f"{other} run, param, tag or dataset entries")
    if values:
        shown = ", ".join(keys[:4]) + (", ..." if len(keys) > 4 else "")
        parts.append(f"{values} metric values ({shown})")
    if artifacts:
        shown = ", ".join(artifacts[:3]) + (", ..." if len(artifacts) > 3 else "")
        parts.append(f"{len(artifacts)} artifacts ({shown})")
    if status:
        parts.append(f"the status {status}")
    return "; ".join(p for p in parts if p)
