"""`bench table`: regenerate benchmark.md and benchmark.png, or print another dataset's table or every record."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from harness.config.benchmark import REFERENCE_DATASET
from harness.files import atomic_write_text
from harness.report.table import render, render_every_record, write_benchmark


def table(dataset: Optional[str], out: Optional[Path], all_records: bool, tolerance: Optional[float]
          ) -> tuple[str, bool]:
    """(what to print, whether it is a message rather than the table itself). `--all` without `--dataset` lists
    every record of every dataset."""
    if all_records and dataset is None:
        text = render_every_record()
    elif (dataset or REFERENCE_DATASET) == REFERENCE_DATASET and out is None and not all_records:
        return f"wrote {write_benchmark(tolerance=tolerance)}", True
    else:
        text = render(dataset or REFERENCE_DATASET, all_records=all_records, tolerance=tolerance)
    if out is None:
        return text, False
    atomic_write_text(out, text)
    return f"wrote {out}", True
