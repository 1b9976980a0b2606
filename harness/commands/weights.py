"""`bench weights`: the starting-weight files the rows expect, where, and whether they are present."""

from __future__ import annotations

import fnmatch

from tabulate import tabulate

from harness.config.spec import load_all
from harness.models.weights import expected_files


def weights(pattern: str = "*") -> tuple[str, int]:
    """The table of files, and how many are missing."""
    lines = []
    for spec in load_all():
        if not fnmatch.fnmatch(spec.row, pattern):
            continue
        files = expected_files(spec)
        if not files:
            lines.append([spec.row, "-", "(none: random initialisation, as the table's run)", "-"])
        for key, path in files:
            lines.append([spec.row, key, str(path), "present" if path.is_file() else "MISSING"])
    text = tabulate(lines, headers=["row", "spec key", "file", "status"], disable_numparse=True)
    return text, sum(1 for line in lines if line[3] == "MISSING")
