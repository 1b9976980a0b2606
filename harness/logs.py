"""Diagnostics: notes and warnings as plain lines on stderr (what a terminal, a log file or a Slurm log shows),
through `logging` under the "harness" logger. Progress bars and command output are not logging."""

from __future__ import annotations

import logging
import sys
from typing import Any


class StderrHandler(logging.StreamHandler):
    """Plain lines on whatever stderr is when a record is logged (a test's or a redirected one included)."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def configure_logging(level: int = logging.INFO) -> None:
    """Send the project's diagnostics to stderr as bare messages; safe to call again."""
    logger = logging.getLogger("harness")
    if not any(isinstance(h, StderrHandler) for h in logger.handlers):
        handler = StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
