"""Diagnostics: notes and warnings as plain lines on stderr (what a terminal, a log file or a Slurm log shows),
through `logging` under the "harness" logger. Progress bars and command output are not logging."""

from __future__ import annotations

import logging
import os
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


MIN_BAR_COLUMNS = 40  # narrower than this, a progress bar shows nothing useful (tqdm draws nothing at 0 columns)


def bar_fits(stream: Any = None) -> bool:
    """A progress bar can be drawn: `stream` (default stderr) is a terminal with a width. A terminal of 0 columns
    (a pty as `script` or some CI runners give) gets plain lines instead."""
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty()) and os.get_terminal_size(stream.fileno()).columns >= MIN_BAR_COLUMNS
    except (AttributeError, OSError, ValueError):
        return False


def configure_logging(level: int = logging.INFO) -> None:
    """Send the project's diagnostics to stderr as bare messages; safe to call again."""
    logger = logging.getLogger("harness")
    if not any(isinstance(h, StderrHandler) for h in logger.handlers):
        handler = StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
