"""`bench doctor`: one table of go / no-go checks for a row before an expensive run (harness.report.readiness)."""

from __future__ import annotations

from harness.report.readiness import Check, DoctorOptions
from harness.report.readiness import doctor as run_doctor


def doctor(options: DoctorOptions) -> tuple[str, list[Check]]:
    """The rendered table and the checks."""
    return run_doctor(options)
