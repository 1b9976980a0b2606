"""`bench doctor`: one table of go / no-go checks for a row before an expensive run (harness.report.readiness)."""

from __future__ import annotations

from harness.config.spec import training_row
from harness.report.readiness import Check, DoctorOptions, render, run_checks


def doctor(options: DoctorOptions) -> tuple[str, list[Check]]:
    """The rendered table and the checks (a light-seg row is checked as the row it trains)."""
    row, _ = training_row(options.row)
    checks = run_checks(DoctorOptions(**{**options.__dict__, "row": row}))
    return render(checks), checks
