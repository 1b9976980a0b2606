"""A run's tracker: what training, evaluation and sync talk to. Backend-neutral: everything a run logs goes first to
its journal (harness.tracking.journal) and then, from a background thread, to one sink: that of the backend
registered under the URI's scheme (harness.tracking.backends; MLflow by default). When the store goes away mid-run
the thread stops sending, training goes on, and `bench sync` later replays what the journal holds and the store
lacks. `--offline-tracking` only journals.
"""

from __future__ import annotations

import logging
import math
import queue
import shutil
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

from harness.config.curves import TRAIN, VAL, grouped
from harness.errors import BenchError
from harness.tracking.backends import open_sink
from harness.tracking.journal import JOURNAL_DIR, Journal, describe_pending
from harness.tracking.sink import Sink, first_line, replay, send_entry

log = logging.getLogger(__name__)

EXPERIMENT_PREFIX = "segbench"
_QUEUE_SIZE = 10000  # entries waiting for the sender; beyond that they stay journalled for `bench sync`
FLUSH_TIMEOUT_S = 30.0  # how long the end of a run waits for a slow store before leaving the rest to `bench sync`
HEADLINE = ("miou", "reference_miou", "delta_miou")  # one per run, ungrouped, so the runs table shows them first
# Single-point summaries, ungrouped too: MLflow's run page charts grouped metrics (the curves) first, ungrouped last.
SUMMARY_PREFIXES = ("best_", "final_", "behind_")  # behind_miou: the early warning (harness.report.behind)
SIGNIFICANT_DIGITS = 6  # what a metric is logged with: 54.6212, not 54.62123870849609

__all__ = ["JOURNAL_DIR", "Journal", "Tracker", "open_store", "sync_journal"]


def experiment_name(dataset: str) -> str:
    return f"{EXPERIMENT_PREFIX}-{dataset}"


def metric_name(key: str) -> str:
    """The training loop's keys grouped as trackers chart them (harness.config.curves): `train_loss` -> `train/loss`,
    `val_miou` -> `val/miou`, anything else of the loop (`lr`, `images_per_s`) under `train/`; grouped names pass."""
    if "/" in key or key in HEADLINE or key.startswith(SUMMARY_PREFIXES):
        return key
    for group in (VAL, TRAIN):
        if key.startswith(group + "_"):
            return grouped(group, key[len(group) + 1:])
    return grouped(TRAIN, key)


def metric_value(value: float) -> float:
    """A logged value: integers exact, anything else to SIGNIFICANT_DIGITS (float32 noise is no information)."""
    value = float(value)
    return value if value.is_integer() else float(f"{value:.{SIGNIFICANT_DIGITS}g}")


def class_key(name: str) -> str:
    return name.replace(" ", "_")


def open_store(uri: str) -> Sink:
    """The sink for a tracking URI, from the backend registered under its scheme (harness.tracking.backends)."""
    return open_sink(uri)


def _now_ms() -> int:
    return int(time.time() * 1000)


class Tracker:
    """A run's view of its store. Start-up talks to the store directly (a dead store fails in seconds with one
    line); everything after goes through the journal and a bounded queue, so training never waits on it."""

    def __init__(self, tracking_uri: str, dataset: str, offline: bool = False):
        self.tracking_uri, self.dataset, self.offline = tracking_uri, dataset, offline
        self.sink: Optional[Sink] = None if offline else open_store(tracking_uri)
        if self.sink is not None:
            self.sink.prepare(experiment_name(dataset))
        self.run_id: Optional[str] = None
        self.journal: Optional[Journal] = None
        self.failure: Optional[str] = None  # why the sender stopped
        self._queue: queue.Queue = queue.Queue(maxsize=_QUEUE_SIZE)
        self._thread: Optional[threading.Thread] = None
        self.status: Optional[str] = None

    @property
    def store_kind(self) -> str:
        return self.sink.kind if self.sink is not None else "the tracking store"

    # --- start --------------------------------------------------------------------------------

    def start(self, journal_dir: Path, run_name: str, params: dict[str, Any], tags: dict[str, str]) -> Optional[str]:
        """Create the run (journalled; sent now unless offline) and return its id (None offline)."""
        self.journal = Journal(journal_dir)
        entries = [
            self.journal.append({"op": "create", "experiment": experiment_name(self.dataset), "run_name": run_name,
                                 "tracking_uri": self.tracking_uri, "tags": {**tags, "mlflow.runName": run_name},
                                 "time": _now_ms()}),
            self.journal.append({"op": "params", "params": {k: str(v) for k, v in params.items()}}),
        ]
        if self.sink is not None:
            try:
                for entry in entries:
                    self.run_id = send_entry(self.sink, self.journal, entry, self.run_id)
            except Exception as exc:
                raise BenchError(f"{self.sink.kind} at '{self.tracking_uri}' refused the new run: {first_line(exc)}; "
                                 "fix the store or pass --offline-tracking") from None
        self._start_sender()
        return self.run_id

    def reopen(self, journal_dir: Path, run_id: Optional[str]) -> Optional[str]:
        """Continue a resumed run in its own run of the store: first replay what the interrupted part did not send."""
        self.journal = Journal(journal_dir)
        if self.sink is not None and self.journal.entries():
            try:
                replay(self.journal, self.sink)
            except Exception as exc:
                raise BenchError(f"cannot bring the resumed run up to date in {self.sink.kind} at "
                                 f"'{self.tracking_uri}': {first_line(exc)}; pass --offline-tracking to continue "
                                 "locally") from None
        self.run_id = self.journal.run_id(self.tracking_uri) or run_id
        self._start_sender()
        self._submit({"op": "status", "status": "RUNNING", "time": _now_ms()})
        return self.run_id

    def _start_sender(self) -> None:
        if self.sink is not None:
            self._thread = threading.Thread(target=self._sender, name="tracking-sender", daemon=True)
            self._thread.start()

    def _sender(self) -> None:
        assert self.sink is not None and self.journal is not None
        while True:
            entry = self._queue.get()
            if entry is None:
                return
            if self.failure is not None:
                continue  # stays journalled for `bench sync`
            try:
                self.run_id = send_entry(self.sink, self.journal, entry, self.run_id)
            except Exception as exc:  # a dead or failing store: stop trying, keep training
                self.failure = first_line(exc)
                log.warning("warning: %s at %s stopped answering (%s); training continues and logs to %s; replay "
                            "later with `bench sync %s`", self.sink.kind, self.tracking_uri, self.failure,
                            self.journal.folder, self.journal.folder.parent)

    def _submit(self, entry: dict[str, Any]) -> None:
        assert self.journal is not None
        entry = self.journal.append(entry)
        if self._thread is not None:
            try:
                self._queue.put_nowait(entry)
            except queue.Full:  # a slow store: the entry waits in the journal
                self.failure = self.failure or "too many entries waiting for a slow store"

    # --- logging ------------------------------------------------------------------------------

    def log_metrics(self, metrics: Mapping[str, Optional[float]], step: int) -> None:
        clean = {metric_name(k): metric_value(v) for k, v in metrics.items()
                 if v is not None and math.isfinite(float(v))}
        if clean:
            self._submit({"op": "metrics", "metrics": clean, "step": int(step), "time": _now_ms()})

    def set_tags(self, tags: dict[str, str]) -> None:
        self._submit({"op": "tags", "tags": {k: str(v) for k, v in tags.items()}})

    def set_tag(self, key: str, value: str) -> None:
        self.set_tags({key: value})

    def log_dataset(self, name: str, split: str, context: str, digest: str, images: int, source: str) -> None:
        """The data a run read, as an MLflow dataset input: `name` (the dataset), `split`, how many images, the
        split's digest (harness.data.cityscapes.split_digest) and where it lay; `context` is MLflow's word for its
        use ("training", "validation")."""
        self._submit({"op": "dataset", "name": name, "split": split, "context": context, "digest": digest,
                      "images": int(images), "source": source})

    def log_artifact(self, local: Path, artifact_path: Optional[str] = None) -> None:
        assert self.journal is not None
        relative = Path(artifact_path or ".") / Path(local).name
        target = self.journal.artifacts / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        if Path(local).resolve() != target.resolve():
            shutil.copyfile(local, target)
        self._submit({"op": "artifact", "path": relative.as_posix()})

    def log_text(self, text: str, artifact_file: str) -> None:
        self.artifact_path(artifact_file).write_text(text)
        self._submit({"op": "artifact", "path": Path(artifact_file).as_posix()})

    def artifact_path(self, artifact_file: str) -> Path:
        """Where to write a file that `log_artifact(path, folder)` will then log without copying."""
        assert self.journal is not None
        path = self.journal.artifacts / artifact_file
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    # --- the end ------------------------------------------------------------------------------

    def finish(self, status: str = "FINISHED") -> Optional[str]:
        """End the run with `status`, wait (bounded) for the sender, and return a warning naming what the store
        did not receive (None when everything arrived). Safe to call twice; the second call does nothing."""
        if self.journal is None or self.status is not None:
            return None
        self.status = status
        self._submit({"op": "status", "status": status, "time": _now_ms()})
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(FLUSH_TIMEOUT_S)
            if self._thread.is_alive():
                self.failure = self.failure or f"the store took longer than {FLUSH_TIMEOUT_S:.0f} s"
        if self.sink is not None:
            self.sink.close()
        pending = self.journal.pending(self.tracking_uri)
        if not pending:
            return None
        run_folder = self.journal.folder.parent
        if self.offline:
            message = (f"tracking offline: the run is kept in {self.journal.folder}; log it to the store with "
                       f"`bench sync {run_folder}`")
        else:
            message = (f"warning: not logged to {self.store_kind} at {self.tracking_uri} "
                       f"({self.failure or 'unknown failure'}): {describe_pending(pending)}; replay with "
                       f"`bench sync {run_folder}`")
        log.warning(message)
        return message


def _run_journal(journal_dir: Path, tracking_uri: Optional[str]) -> tuple[Journal, str]:
    """A run's journal and the store to send it to (by default the one the run used)."""
    journal = Journal(journal_dir)
    header = journal.header()
    if not header:
        raise BenchError(f"{journal_dir} holds no tracking journal; give a run folder written by `bench run` or "
                         "`bench eval`")
    return journal, tracking_uri or header["tracking_uri"]


def sync_journal(journal_dir: Path, tracking_uri: Optional[str] = None) -> tuple[Optional[str], int]:
    """Replay a run's journal into a store: (run id there, entries sent). The URI defaults to the one the run used."""
    journal, uri = _run_journal(journal_dir, tracking_uri)
    sink = open_store(uri)
    try:
        sent = replay(journal, sink)
    except BenchError:
        raise
    except Exception as exc:
        raise BenchError(f"sync of {journal_dir} to {sink.kind} at '{uri}' stopped: {first_line(exc)}; "
                         "run `bench sync` again when the store answers") from None
    finally:
        sink.close()
    return journal.run_id(uri), sent


def log_artifact_later(journal_dir: Path, relative: str, tracking_uri: Optional[str] = None) -> str:
    """Log a file already in a run's artifact folder to the run after it ended (e.g. a card written afterwards):
    journalled like any artifact, then sent at once when the store has everything else of the run; otherwise it
    waits, with the rest, for `bench sync`. Returns a line saying which."""
    journal, uri = _run_journal(journal_dir, tracking_uri)
    waiting = journal.pending(uri)
    journal.append({"op": "artifact", "path": relative})
    if waiting:
        return (f"{relative} journalled; the run has {len(waiting)} entries {uri} lacks: send them with `bench sync "
                f"{journal_dir.parent}`")
    try:
        sync_journal(journal_dir, uri)
    except BenchError as exc:
        return f"{relative} journalled, not sent ({exc}); send it later with `bench sync {journal_dir.parent}`"
    return f"{relative} logged to the run in {uri}"
