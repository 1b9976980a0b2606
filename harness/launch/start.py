"""`bench run`'s way in: the cheap checks first, then PyTorch, the model families and the run itself
(harness.launch.run), so that a misspelt row or a missing folder is answered before seconds of imports."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

from harness.config.spec import training_row
from harness.launch.options import LaunchOptions, RunOptions, check_before_loading


def start(options: RunOptions, seeds: Sequence[int], launch: LaunchOptions, echo: Callable[[str], None] = print) -> int:
    """The exit code of training `options.row` once per seed on `launch`'s processes."""
    check_before_loading(replace(options, row=training_row(options.row)[0]), seeds, launch.processes)
    from harness.launch.run import main

    return main(options, seeds, launch, echo=echo)
