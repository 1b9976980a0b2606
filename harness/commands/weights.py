"""`bench weights`: each starting-weight file the rows expect, once: the rows that use it, where it comes from
(harness.models.provenance), and whether it is here with the published checksum."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from pathlib import Path

from tabulate import tabulate

from harness.config.spec import load_all, load_ours
from harness.errors import BenchError
from harness.models.provenance import MISSING, FileCheck, check_file
from harness.models.weights import expected_files

WRAP_ROWS, WRAP_SOURCE = 30, 40  # columns the rows and the source wrap at


@dataclass
class WeightsReport:
    text: str
    checks: list[FileCheck]

    @property
    def missing(self) -> int:
        return sum(1 for c in self.checks if c.status == MISSING)

    @property
    def verified_nothing(self) -> bool:
        """Every file missing: `--verify` hashed none (exit non-zero, not a plain table and 0)."""
        return bool(self.checks) and self.missing == len(self.checks)

    @property
    def mismatched(self) -> list[FileCheck]:
        return [c for c in self.checks if c.mismatch]


def files_by_row(pattern: str = "*") -> tuple[dict[Path, list[str]], list[str]]:
    """(each expected file -> the rows expecting it, in table order; rows that expect none)."""
    specs = [s for s in load_all() + load_ours() if fnmatch.fnmatch(s.row, pattern)]
    if not specs:
        raise BenchError(f"--rows {pattern!r} matches no row; see `bench list` for the row ids")
    files: dict[Path, list[str]] = {}
    none = []
    for spec in specs:
        expected = expected_files(spec)
        if not expected:
            none.append(spec.row)
        for _, path in expected:
            files.setdefault(path, []).append(spec.row)
    return files, none


def weights(pattern: str = "*", verify: bool = False) -> WeightsReport:
    """The table of files; with `verify`, every present file is hashed against its published checksum."""
    files, none = files_by_row(pattern)
    lines, checks = [], []
    for path, rows in files.items():
        checked = check_file(path, verify=verify)
        checks.append(checked)
        source = checked.source.where if checked.source else "not in the provenance table (one of our rows' files)"
        published = checked.source.sha1 if checked.source and checked.source.sha1 else "none published"
        lines.append([str(path), ", ".join(rows), source, published, checked.describe()])
    if none:
        lines.append(["(none)", ", ".join(none), "random initialisation, as the table's run", "-", "-"])
    # The rows and the sources wrap (at spaces: a URL stays whole on its line) so that the table fits a terminal.
    text = tabulate(lines, headers=["file", "rows", "source", "published SHA-1", "status"], disable_numparse=True,
                    maxcolwidths=[None, WRAP_ROWS, WRAP_SOURCE, None, None], break_long_words=False,
                    break_on_hyphens=False)
    if not verify and any(c.status != MISSING and c.source and c.source.sha1 for c in checks):
        text += "\n--verify hashes the present files against their published checksums"
    return WeightsReport(text, checks)
