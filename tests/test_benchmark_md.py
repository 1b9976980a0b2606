"""The committed benchmark.md is what `bench table` makes of the committed experiments/ and results/."""

from __future__ import annotations

from harness.paths import PROJECT_ROOT
from harness.report.table import render


def test_committed_benchmark_md_is_regenerated_byte_for_byte(monkeypatch):
    monkeypatch.delenv("SEGBENCH_RESULTS")  # the repository's own results/, not the test's empty folder
    assert render("cityscapes") == (PROJECT_ROOT / "benchmark.md").read_text(), "run `bench table` and commit benchmark.md"
