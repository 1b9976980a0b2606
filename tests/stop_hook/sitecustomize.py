"""Imported at start-up by every Python process whose PYTHONPATH holds this folder (`site` imports `sitecustomize`):
with ORDER_ENV set, the training process of one rank stops right after a chosen iteration, so that a test's kill or
signal lands at a known iteration instead of racing a run that may finish first. The processes a `bench` command
starts (torchrun's workers, a sweep's jobs and their `bench run`) inherit the environment, so the order reaches the
process that trains, however deep. tests/helpers.py `stop_at` writes the order; nothing in harness/ knows of it.

The order (JSON): `iteration`; `then`: "SIGKILL" (the process kills itself: nothing is flushed, no handler runs) or
"wait" (it waits until the run's signal handler has run `signals` times: the test sends them, and each one arrives
while the training is held at a known iteration); `rank` (default 0; a process without RANK is rank 0); `row` and
`seed` (optional: the run it is for, where a sweep trains several); `ready`: a file written (atomically, with the
process id) when the iteration is reached. The order is carried out once: a process that finds `ready` already there
(a resumed run passing the iteration again) trains on.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

ORDER_ENV = "SEGBENCH_TEST_STOP_AT"
WAIT_S = 300.0  # a test that never sends its signal fails within this, instead of hanging


def install(order: dict[str, Any]) -> None:
    from harness.engine.train import Trainer

    ready = Path(order["ready"])
    handle_signal, train_step = Trainer._handle_signal, Trainer.train_step
    handled = 0

    def counting_handler(self: Trainer, signum: int, frame: Any) -> None:
        nonlocal handled
        handled += 1  # before the handler: a second Ctrl-C raises from it
        handle_signal(self, signum, frame)

    def stopping_step(self: Trainer, *args: Any) -> None:
        train_step(self, *args)
        if self.iteration != order["iteration"] or ready.exists() or any(
                key in order and order[key] != getattr(self.plan, key) for key in ("row", "seed")):
            return
        seen = handled
        staged = ready.with_name(ready.name + ".tmp")
        staged.write_text(json.dumps({"pid": os.getpid(), "iteration": self.iteration}))
        staged.rename(ready)
        if order["then"] == "SIGKILL":
            os.kill(os.getpid(), signal.SIGKILL)
        deadline = time.monotonic() + WAIT_S
        while handled < seen + order.get("signals", 1):
            if time.monotonic() > deadline:
                raise SystemExit(f"held after iteration {self.iteration} for {WAIT_S:g} s: no signal came")
            time.sleep(0.01)  # a signal's handler runs in this loop, between two sleeps

    Trainer._handle_signal = counting_handler  # type: ignore[method-assign]
    Trainer.train_step = stopping_step  # type: ignore[method-assign]


if __name__ == "sitecustomize" and os.environ.get(ORDER_ENV):  # not when tests/helpers.py reads ORDER_ENV
    _order = json.loads(os.environ[ORDER_ENV])
    if int(os.environ.get("RANK", "0")) == _order.get("rank", 0):
        install(_order)
