"""`bench sync`: replay what runs journalled but a tracking store did not get (offline runs, outages, or another
store), per store: a run complete in one store is sent in full to another."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from harness import paths
from harness.engine.run_folder import RUN_STATUS, RunFolder
from harness.errors import BenchError
from harness.tracking.journal import JOURNAL_DIR, JOURNAL_FILE, Journal
from harness.tracking.tracker import sync_journal


@dataclass
class SyncReport:
    lines: list[str] = field(default_factory=list)
    damaged: list[str] = field(default_factory=list)  # journal lines that could not be sent, described
    skip_damaged: bool = False  # their loss accepted: each is a warning, and the exit code 0

    @property
    def text(self) -> str:
        """What was sent (or found complete), a line per run."""
        return "\n".join(self.lines)

    def problems(self) -> list[str]:
        """The lines for stderr: one per damaged journal line, naming the file, the line and the fix."""
        if self.skip_damaged:
            return [f"warning: damaged journal line not sent (accepted with --skip-damaged): {damaged}"
                    for damaged in self.damaged]
        return [f"error: damaged journal line not sent: {damaged}; the rest was sent; fix or delete the line and "
                "sync again, or pass --skip-damaged to accept its loss" for damaged in self.damaged]

    @property
    def exit_code(self) -> int:
        return 1 if self.damaged and not self.skip_damaged else 0


def _store_of(journal: Journal, tracking_uri: Optional[str]) -> Optional[str]:
    return tracking_uri or journal.tracking_uri()


def sync_runs(run_dirs: list[Path], tracking_uri: Optional[str] = None, skip_damaged: bool = False) -> SyncReport:
    """Replay each run folder's journal into its store, or into `tracking_uri` (default: every run with entries
    that store lacks). A run still marked running whose process is gone is ended KILLED in both places first.
    Damaged journal lines (a crash mid-write, an edit) are named in the report: they cannot be sent, which fails the
    sync unless `skip_damaged` accepts their loss."""
    report = SyncReport(skip_damaged=skip_damaged)
    if not run_dirs:
        run_dirs = []
        for journal_file in sorted(paths.runs_dir().glob(f"**/{JOURNAL_DIR}/{JOURNAL_FILE}")):
            journal = Journal(journal_file.parent)
            store = _store_of(journal, tracking_uri)
            if store and (journal.pending(store) or journal.damaged()):
                run_dirs.append(journal_file.parent.parent)
        if not run_dirs:
            report.lines.append(f"nothing to sync: every run under {paths.runs_dir()} is complete in "
                                f"{tracking_uri or 'its store'}")
            return report
    for run_dir in run_dirs:
        if not Journal.exists(run_dir / JOURNAL_DIR):
            raise BenchError(f"{run_dir} has no tracking journal ({JOURNAL_DIR}/{JOURNAL_FILE}); give a run folder "
                             "written by `bench run` or `bench eval`")
        folder = RunFolder.open(run_dir)
        journal = Journal(run_dir / JOURNAL_DIR)
        if folder.info.get("status") == RUN_STATUS["RUNNING"] and folder.status == RUN_STATUS["KILLED"]:
            journal.end("KILLED", int(time.time() * 1000))
            folder.end("KILLED")
            report.lines.append(f"{run_dir}: its process is gone; marked interrupted (KILLED)")
        run_id, sent = sync_journal(run_dir / JOURNAL_DIR, tracking_uri)
        own_store = tracking_uri is None or tracking_uri == journal.tracking_uri()
        if own_store and run_id and folder.tracking_run_id != run_id:
            folder.update(tracking_run_id=run_id)
        store = _store_of(journal, tracking_uri)
        report.lines.append(f"{run_dir}: {sent} entries sent to run {run_id} at {store}" if sent
                            else f"{run_dir}: already complete in run {run_id} at {store}")
        report.damaged += [line.describe() for line in journal.damaged()]
    return report
