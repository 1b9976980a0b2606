"""Each starting-weight file the rows expect, once: the rows that use it, where it comes from
(harness.models.provenance), and whether it is here with the published checksum (`bench weights`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tabulate import tabulate

from harness.config.spec import Spec, select_rows
from harness.errors import BenchError
from harness.models.provenance import MISSING, FileCheck, check_file
from harness.models.weights import expected_files, verify_file, weights_folder_problem

WRAP_ROWS, WRAP_SOURCE = 30, 40  # columns the rows and the source wrap at


@dataclass
class WeightsReport:
    text: str
    checks: list[FileCheck]
    verify: bool = False

    @property
    def verified_nothing(self) -> bool:
        """`--verify` with every file missing hashed none (exit non-zero, not a plain table and 0)."""
        return self.verify and bool(self.checks) and self.missing == len(self.checks)

    @property
    def missing(self) -> int:
        return sum(1 for c in self.checks if c.status == MISSING)

    @property
    def mismatched(self) -> list[FileCheck]:
        """Present files a run cannot start from: another checksum, unreadable, or not this network's tensors."""
        return [c for c in self.checks if c.unusable]

    def problems(self) -> list[str]:
        """The lines for stderr: what is missing and where it comes from, then each file that is not the one the
        rows expect."""
        lines = []
        if self.missing:
            lines.append(f"{self.missing} file(s) missing: bring them from the source shown (nothing is downloaded); "
                         "relative paths are read from the project root, or from $SEGBENCH_WEIGHTS for weights/...")
        for checked in self.mismatched:
            where = checked.source.where if checked.source else "?"
            lines.append(f"error: {checked.path}: {checked.describe()}; it is not the file the rows expect, and a run "
                         f"on it does not count: fetch it again from {where}")
        if self.verified_nothing:
            lines.append(f"error: --verify verified nothing: all {self.missing} file(s) are missing; bring them from "
                         "the sources shown, then verify again")
        return lines

    @property
    def exit_code(self) -> int:
        return 1 if self.mismatched or self.verified_nothing else 0


def files_by_row(pattern: str = "*") -> tuple[dict[Path, list[Spec]], list[str], dict[Path, str]]:
    """(each expected file -> the rows expecting it, in table order; rows that expect none; each file's spec key)."""
    files: dict[Path, list[Spec]] = {}
    keys: dict[Path, str] = {}
    none = []
    for spec in select_rows(pattern):
        expected = expected_files(spec)
        if not expected:
            none.append(spec.row)
        for key, path in expected:
            files.setdefault(path, []).append(spec)
            keys.setdefault(path, key)
    return files, none, keys


def weights_report(pattern: str = "*", verify: bool = False) -> WeightsReport:
    """The table of files; with `verify`, every present file is hashed against its published checksum, and one
    with none published is loaded (`weights_only`) and matched against its first row's network by name and shape."""
    files, none, keys = files_by_row(pattern)
    problem = weights_folder_problem()
    if problem and any(not path.is_file() for path in files):
        raise BenchError(problem)
    lines, checks = [], []
    for path, specs in files.items():
        checked = verify_file(specs[0], keys[path], path) if verify else check_file(path, verify=False)
        checks.append(checked)
        source = checked.source.where if checked.source else "not in the provenance table (one of our rows' files)"
        published = checked.source.sha1 if checked.source and checked.source.sha1 else "none published"
        lines.append([str(path), ", ".join(s.row for s in specs), source, published, checked.describe()])
    if none:
        lines.append(["(none)", ", ".join(none), "random initialisation, as the table's run", "-", "-"])
    # The rows and the sources wrap (at spaces: a URL stays whole on its line) so that the table fits a terminal.
    text = tabulate(lines, headers=["file", "rows", "source", "published SHA-1", "status"], disable_numparse=True,
                    maxcolwidths=[None, WRAP_ROWS, WRAP_SOURCE, None, None], break_long_words=False,
                    break_on_hyphens=False)
    if not verify and any(c.status != MISSING and c.source and c.source.sha1 for c in checks):
        text += "\n--verify hashes the present files against their published checksums"
    return WeightsReport(text, checks, verify)
