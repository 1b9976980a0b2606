"""`bench compare A B [C ...]`: per-class IoU of runs, records, MLflow runs or rows side by side, sorted by the
largest gap, with the recipe fields and versions that differ; optionally a heatmap and JSON."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from harness import paths
from harness.config.benchmark import REFERENCE_DATASET
from harness.data.cityscapes import CLASS_NAMES
from harness.errors import BenchError
from harness.outputs.plots import per_class_heatmap
from harness.report.compare import comparison, load_comparable, render, to_json


def compare(arguments: list[str], *, as_json: bool = False, figure: Optional[Path] = None,
            tracking_uri: Optional[str] = None, dataset: str = REFERENCE_DATASET) -> str:
    """The comparison's text (or JSON); with `figure`, also the heatmap there."""
    if len(arguments) < 2:
        raise BenchError("bench compare needs at least two runs, records, MLflow run ids or rows (e.g. bench compare "
                         "runs/cityscapes/sf_seg_v2/20261125-101500 sf_seg_v2)")
    uri = tracking_uri or paths.default_tracking_uri()
    items = [load_comparable(argument, uri, dataset) for argument in arguments]
    result = comparison(items)
    if figure is not None:
        labels = [f"{chr(ord('A') + i)}: {item.row} ({item.source.split(' (')[0]})" for i, item in enumerate(items)]
        per_class_heatmap(labels, list(CLASS_NAMES), [[item.per_class[name] for name in CLASS_NAMES] for item in items],
                          figure, title="per-class IoU (%)")
        result["figure"] = str(figure)
    if as_json:
        return to_json(result)
    return render(result) + (f"\nheatmap {figure}" if figure is not None else "")
