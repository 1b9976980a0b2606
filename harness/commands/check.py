"""`bench check`: each row's verdict from the Cityscapes reproductions, as a table or JSON; a row with results
outside the tolerance makes the exit code 1."""

from __future__ import annotations

from typing import Optional

from harness.report.verdicts import check_report, check_rows


def check(pattern: str, tolerance: Optional[float], as_json: bool) -> tuple[str, int]:
    verdicts = check_rows(pattern, tolerance)
    return check_report(verdicts, as_json), 1 if any(v.outside for v in verdicts) else 0
