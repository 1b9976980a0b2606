"""`bench sync`: send what runs journalled to the tracking store (harness.tracking.sync does the work)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from harness.tracking.sync import SyncReport, sync_runs


def sync(run_dirs: list[Path], tracking_uri: Optional[str], skip_damaged: bool) -> SyncReport:
    """What was sent (the report's lines), each damaged journal line (its problems) and the exit code."""
    return sync_runs(run_dirs, tracking_uri, skip_damaged)
