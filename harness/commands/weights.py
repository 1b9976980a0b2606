"""`bench weights`: each starting-weight file the rows expect, once (harness.report.weight_files)."""

from __future__ import annotations

from harness.report.weight_files import WeightsReport, weights_report


def weights(pattern: str = "*", verify: bool = False) -> WeightsReport:
    """The table of files; with `verify`, every present file is hashed against its published checksum."""
    return weights_report(pattern, verify)
