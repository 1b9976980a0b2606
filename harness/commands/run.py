"""`bench run`: train and evaluate rows (harness.launch.run does the work: every check, then the training)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

from harness.launch.options import LaunchOptions, RunOptions
from harness.launch.start import start


def run(options: RunOptions, seeds_text: Optional[str], launch: LaunchOptions,
        echo: Callable[[str], None] = print) -> int:
    """The exit code of training `options.row` once per seed (`--seed`, or the `--seeds` list) on `launch`'s
    processes."""
    return start(options, seeds_text, launch, echo=echo)
