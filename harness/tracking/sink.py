"""A store a run's journal is replayed into. A sink applies one journal entry at a time; the caller records the
acknowledgement, per store, so that any store can be brought up to date by replaying what it lacks."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Optional

from harness.errors import BenchError
from harness.tracking.journal import Journal

# Run statuses (MLflow's words, which every sink understands) that end a run.
TERMINAL = ("FINISHED", "FAILED", "KILLED")
# The journal's tags for where a run came from: MLflow's source fields (its UI shows them on the run page), which
# every other sink keeps as plain tags.
SOURCE_NAME, SOURCE_TYPE, GIT_COMMIT = "mlflow.source.name", "mlflow.source.type", "mlflow.source.git.commit"


def source_tags(commit: str, entry_point: str) -> dict[str, str]:
    """The commit (`git_dirty` apart) and the entry point, as the journal's tags."""
    sha, dirty = (commit[:-len("-dirty")], True) if commit.endswith("-dirty") else (commit, False)
    tags = {SOURCE_NAME: entry_point, SOURCE_TYPE: "LOCAL", "git_dirty": str(dirty).lower()}
    if sha != "unknown":
        tags[GIT_COMMIT] = sha
    return tags


class Sink(ABC):
    """One tracking store. `uri` names it: acknowledgements are kept per URI."""

    uri: str
    kind: str  # "MLflow", "TensorBoard": for messages

    @abstractmethod
    def send(self, journal: Journal, entry: dict[str, Any], run_id: Optional[str]) -> Optional[str]:
        """Apply one journal entry; a "create" entry makes the run and returns its id, any other returns `run_id`."""

    def prepare(self, experiment: str) -> None:
        """Make sure `experiment` can take runs, before any work starts (a store that refuses fails now)."""

    def close(self) -> None:
        """Release what the sink holds open (files, connections)."""


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


def send_entry(sink: Sink, journal: Journal, entry: dict[str, Any], run_id: Optional[str]) -> Optional[str]:
    """Apply `entry` to `sink` and acknowledge it there; returns the run's id in that store."""
    if entry.get("op") != "create" and run_id is None:
        raise BenchError(f"journal {journal.path} has no created run before entry {entry['seq']}")
    new_id = sink.send(journal, entry, run_id)
    if entry.get("op") == "create":
        journal.acknowledge(entry, sink.uri, run_id=new_id)
        return new_id
    journal.acknowledge(entry, sink.uri)
    return run_id


def replay(journal: Journal, sink: Sink) -> int:
    """Send every entry `sink` has not acknowledged, in order; returns how many were sent."""
    run_id = journal.run_id(sink.uri)
    pending = journal.pending(sink.uri)
    for entry in pending:
        run_id = send_entry(sink, journal, entry, run_id)
    return len(pending)
