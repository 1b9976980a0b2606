"""Early warning: at each evaluation, a training run's headline mIoU (the EMA weights of an EMA row, the raw weights
otherwise) against earlier runs of the same row, dataset and planned budget at the same iteration.

Earlier runs are read from their journals (runs/<dataset>/<row>/<stamp>/tracking/journal.jsonl: the `params` entry
holds the planned `iters`, the `metrics` entries the validation curve). The runs `bench table` counts come first
(on Cityscapes: the records `standing` calls reproductions); without one evaluated at this iteration, any earlier
run is compared with. Runs that were themselves stopped behind are never a yardstick.

A run is behind when its mIoU is below the lowest earlier run by more than max(margin, 3 x the earlier runs'
standard deviation): the margin (2 mIoU by default) absorbs the seed-to-seed noise that one or two earlier runs
cannot measure; with more runs, three standard deviations of their spread is what seeds alone rarely reach.
"""

from __future__ import annotations

import logging
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

from harness import paths
from harness.config.benchmark import BEHIND_MARGIN
from harness.config.curves import BEHIND_MIOU, VAL_MIOU_EMA, VAL_MIOU_RAW, VAL_MIOU_UNNAMED
from harness.config.spec import Spec
from harness.engine.run_folder import STOPPED_BEHIND, RunFolder
from harness.report.records import load_records
from harness.report.verdicts import standing
from harness.tracking.journal import JOURNAL_DIR, Journal

log = logging.getLogger(__name__)

SPREAD_FACTOR = 3.0  # x the earlier runs' standard deviation, when that is wider than the margin


def headline_curve_keys(spec: Spec) -> tuple[str, ...]:
    """The journal's names of the validation curve of the row's headline weights, newest first (runs journalled
    before the curves named their weights logged the raw one unnamed)."""
    return (VAL_MIOU_EMA,) if spec.columns.ema else (VAL_MIOU_RAW, VAL_MIOU_UNNAMED)


@dataclass(frozen=True)
class EarlierRun:
    folder: Path
    curve: dict[int, float]  # iteration -> headline validation mIoU
    counted: bool  # a run `bench table` counts


@dataclass(frozen=True)
class Comparison:
    """One evaluation against the earlier runs evaluated at the same iteration."""

    iteration: int
    miou: float
    low: float  # the earlier runs' range at this iteration
    high: float
    spread: float  # their standard deviation (0 for one run)
    runs: int
    counted: bool  # compared with counted runs (else with any earlier runs)
    threshold: float

    @property
    def behind_miou(self) -> float:
        """How far below the lowest earlier run (negative: at or above it)."""
        return self.low - self.miou

    @property
    def flagged(self) -> bool:
        return self.behind_miou > self.threshold

    def describe(self) -> str:
        which = "counted run" if self.counted else "earlier run"
        span = f"{self.low:.2f}" if self.runs == 1 else f"{self.low:.2f}-{self.high:.2f}"
        verdict = (f"{self.behind_miou:.2f} mIoU behind, more than the threshold of {self.threshold:.2f}"
                   if self.flagged else f"within the threshold of {self.threshold:.2f}")
        return (f"mIoU {self.miou:.2f} at iteration {self.iteration} against {span} of {self.runs} {which}(s) of "
                f"the same row, dataset and budget: {verdict}")

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), BEHIND_MIOU: round(self.behind_miou, 4), "flagged": self.flagged}


def _curve(journal_dir: Path, keys: tuple[str, ...], iters: int) -> Optional[dict[int, float]]:
    """The run's curve under the first of `keys` it logged, when its journal says it planned `iters` iterations
    (None otherwise)."""
    if not Journal.exists(journal_dir):
        return None
    journal = Journal(journal_dir)
    if journal.params().get("iters") != str(iters):
        return None
    history = journal.metric_history()
    key = next((k for k in keys if k in history), None)
    curve = {int(step): float(value) for step, value in history.get(key, [])} if key else {}
    return curve or None


def earlier_runs(spec: Spec, dataset: str, iters: int, this_run: Optional[Path]) -> list[EarlierRun]:
    """The other runs of the row on `dataset` that planned `iters` iterations and evaluated at least once."""
    counted = set()
    for record in load_records(dataset=dataset):
        if record.row == spec.row and standing(spec, record).counts:
            counted.add(Path(record.checkpoint).resolve().parent.parent)
    found = []
    for folder in sorted((paths.runs_dir() / dataset / spec.row).glob("*")):
        if not RunFolder.is_run_folder(folder) or (this_run is not None and folder.resolve() == this_run.resolve()):
            continue
        try:
            if RunFolder.open(folder).info.get("status") == STOPPED_BEHIND:
                continue
        except Exception:  # an unreadable run.json: not a yardstick
            continue
        curve = _curve(folder / JOURNAL_DIR, headline_curve_keys(spec), iters)
        if curve:
            found.append(EarlierRun(folder, curve, folder.resolve() in counted))
    return found


class EarlyWarning:
    """Compares each evaluation of one run with its earlier runs; says once when there is nothing to compare."""

    def __init__(self, spec: Spec, dataset: str, iters: int, this_run: Optional[Path],
                 margin: float = BEHIND_MARGIN, earlier: Optional[list[EarlierRun]] = None):
        self.margin = margin
        self.earlier = earlier_runs(spec, dataset, iters, this_run) if earlier is None else earlier
        self._said_nothing = False
        if not self.earlier:
            self._say_nothing(f"early warning: no earlier run of {spec.row} on {dataset} with {iters} planned "
                              "iterations to compare with; this run's evaluations are not compared")

    def _say_nothing(self, line: str) -> None:
        if not self._said_nothing:
            log.info(line)
            self._said_nothing = True

    def compare(self, iteration: int, miou: float) -> Optional[Comparison]:
        """This evaluation against the earlier runs' at `iteration` (counted ones first); None without any."""
        counted = [r.curve[iteration] for r in self.earlier if r.counted and iteration in r.curve]
        values = counted or [r.curve[iteration] for r in self.earlier if iteration in r.curve]
        if not values:
            if self.earlier:
                self._say_nothing(f"early warning: no earlier run evaluated at iteration {iteration}; nothing to "
                                  "compare with (give the same --eval-every to compare)")
            return None
        spread = statistics.pstdev(values) if len(values) > 1 else 0.0
        return Comparison(iteration=iteration, miou=miou, low=min(values), high=max(values), spread=spread,
                          runs=len(values), counted=bool(counted),
                          threshold=max(self.margin, SPREAD_FACTOR * spread))
