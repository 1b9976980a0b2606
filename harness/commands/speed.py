"""`bench speed`: one row's record table, or several rows one after another (harness.launch.speed)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

from harness.engine.benchmark import SpeedOptions
from harness.launch.speed import measure


def speed(options: SpeedOptions, rows_pattern: Optional[str], budget_s: Optional[float],
          echo: Callable[[str], None] = print) -> None:
    """Measure `options.row`, or every row `rows_pattern` names, and echo the tables."""
    measure(options, rows_pattern, budget_s, echo)
