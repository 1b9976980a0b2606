"""`bench doctor`: one table of go / no-go checks for a row before an expensive run (harness.report.readiness)."""

from __future__ import annotations

from harness.report.readiness import DoctorOptions, DoctorReport
from harness.report.readiness import doctor as run_doctor


def doctor(options: DoctorOptions) -> DoctorReport:
    """The checks, their rendered table and the exit code (1 on any no-go)."""
    return run_doctor(options)
