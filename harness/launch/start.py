"""`bench run`'s way in: the cheap checks first, then PyTorch, the model families and the run itself
(harness.launch.run), so that a misspelt row or a missing folder is answered before seconds of imports."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Optional

from harness.config.spec import training_row
from harness.launch.options import LaunchOptions, RunOptions, check_before_loading, run_seeds


def start(options: RunOptions, seeds_text: Optional[str], launch: LaunchOptions,
          echo: Callable[[str], None] = print) -> int:
    """The exit code of training `options.row` on `launch`'s processes once per seed: `options.seed`, or each of
    `seeds_text`'s list (`--seeds 0,1,2`)."""
    seeds = run_seeds(options.seed, seeds_text, options.resume)
    check_before_loading(replace(options, row=training_row(options.row)[0]), seeds, launch.processes)
    from harness.launch.run import main

    return main(options, seeds, launch, echo=echo)
