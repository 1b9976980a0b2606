"""A third tracking backend, for the tests only: each run's journal entries as JSON lines, one file per run, under
DIR of a `jsonl:DIR` URI. It is this module plus one registration
(`harness.tracking.backends.register("jsonl", "tests.jsonl_backend")`): nothing else in segbench changes."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any, Optional

from harness.errors import BenchError
from harness.tracking.backends import StoreCheck, folder_store_check
from harness.tracking.journal import Journal
from harness.tracking.sink import Sink

SCHEME = "jsonl"


def folder_of(uri: str) -> Path:
    path = uri.removeprefix(f"{SCHEME}:")
    if not path:
        raise BenchError(f"tracking URI {uri!r} names no folder; give jsonl:DIR")
    return Path(path).expanduser().resolve()


class JsonLinesSink(Sink):
    kind = "JSON lines"

    def __init__(self, uri: str):
        self.uri, self.folder = uri, folder_of(uri)
        self.folder.mkdir(parents=True, exist_ok=True)

    def send(self, journal: Journal, entry: dict[str, Any], run_id: Optional[str]) -> Optional[str]:
        if entry["op"] == "create":
            run_id = uuid.uuid4().hex
        assert run_id is not None
        with (self.folder / f"{run_id}.jsonl").open("a") as f:
            f.write(json.dumps(entry, sort_keys=True) + "\n")
        return run_id


def open_sink(uri: str) -> Sink:
    return JsonLinesSink(uri)


def check_store(uri: str, writers: int, reach: bool = True) -> StoreCheck:
    return folder_store_check(uri, folder_of(uri), "JSON lines, one file per run")


def runs(uri: str) -> dict[str, list[dict[str, Any]]]:
    """run id -> the entries the store holds, in order."""
    return {path.stem: [json.loads(line) for line in path.read_text().splitlines()]
            for path in folder_of(uri).glob("*.jsonl")}
