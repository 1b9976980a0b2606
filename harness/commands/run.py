"""`bench run`: train and evaluate rows (harness.launch.run does the work: every check, then the training)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from harness.launch.options import LaunchOptions, RunOptions
from harness.launch.start import start


def run(options: RunOptions, seeds: Sequence[int], launch: LaunchOptions, echo: Callable[[str], None] = print) -> int:
    """The exit code of training `options.row` once per seed on `launch`'s processes."""
    return start(options, seeds, launch, echo=echo)
