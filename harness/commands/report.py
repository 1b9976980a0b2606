"""`bench report RUN`: (re)write a finished run's reproduction card, report.md, in its run folder and log it to the
run's tracked run (for runs that finished before cards existed, or after the row's reference changed)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from harness.config.spec import load_spec
from harness.engine.run_folder import RUN_STATUS, RunFolder
from harness.errors import BenchError
from harness.report.card import CARD
from harness.report.compare import record_of_folder
from harness.report.finish import write_cards
from harness.tracking.journal import JOURNAL_DIR, Journal
from harness.tracking.tracker import log_artifact_later


def report(run: Path, tracking_uri: Optional[str] = None) -> str:
    """The line naming the card written and where it was logged."""
    folder = RunFolder.open(run)
    if folder.status != RUN_STATUS["FINISHED"]:
        raise BenchError(f"run {run} is {folder.status}, not finished: a reproduction card describes a finished run "
                         "(resume it with `bench run --resume`)")
    record = record_of_folder(folder)
    spec = load_spec(record.row)
    journal_dir = run / JOURNAL_DIR
    path = write_cards(spec, record, Journal(journal_dir).artifacts, folder, weights=record.weight_files)
    if not Journal.exists(journal_dir):
        return f"wrote {path}; the run folder has no tracking journal: not logged"
    return f"wrote {path}; {log_artifact_later(journal_dir, CARD, tracking_uri)}"
