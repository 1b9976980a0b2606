"""Why two reproductions differ: runs, result records, MLflow runs and rows (their counted runs, averaged) in one
comparable form, their per-class IoU side by side sorted by the largest gap, and the recipe fields and package
versions that differ between them (`bench compare`)."""

from __future__ import annotations

import json
import math
import re
import statistics
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

from harness.config.benchmark import REFERENCE_DATASET
from harness.config.curves import grouped, per_class_group
from harness.config.plan import TrainPlan
from harness.config.spec import Spec, base_row, load_spec
from harness.data.cityscapes import CLASS_NAMES
from harness.engine.run_folder import RUN_FILE, RunFolder
from harness.errors import BenchError
from harness.paths import experiments_dir, results_dir
from harness.report.records import ResultRecord, TrainRecord, load_records, read_record
from harness.report.verdicts import measured_miou, standing
from harness.tracking.journal import JOURNAL_DIR, Journal
from harness.tracking.sink import GIT_COMMIT
from harness.tracking.tracker import class_key

PLAN_FIELDS = tuple(f.name for f in fields(TrainPlan) if f.name != "row")
RECIPE_EXTRA = ("starting_weights",)
ENVIRONMENT_FIELDS = ("device_type", "gpu", "gpu_count", "driver", "cuda_build", "cudnn", "cpu", "os")
MLFLOW_RUN_ID = re.compile(r"[0-9a-f]{32}")
NOT_RECORDED = "(not recorded)"  # a field an older record, or an MLflow run without its record, does not hold


@dataclass
class Comparable:
    """One side of a comparison: what the argument named, reduced to what can be put side by side."""

    label: str  # the argument as given
    source: str  # "run folder", "result record", "MLflow run", "row (N counted runs, averaged)"
    row: str
    dataset: str
    headline: Optional[float]  # the table's statistic (mean over the runs of a row)
    miou: Optional[float]  # the final evaluation's mIoU of the weights whose per-class IoU is shown
    weights: str  # "raw" or "ema": the weight set of the per-class columns
    per_class: dict[str, Optional[float]]
    recipe: dict[str, str] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    runs: int = 1


def _number(value: Any) -> Optional[float]:
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value


def _text(value: Any) -> str:
    """One canonical text per value, the form MLflow params take (so records, journals and MLflow agree)."""
    return str(value)


def _spec(row: str) -> Optional[Spec]:
    try:
        return load_spec(row)
    except BenchError:
        return None  # a record of a row since removed: compared without the row's statistic


def _ema_per_class(spec: Optional[Spec], record: ResultRecord) -> Optional[dict[str, Optional[float]]]:
    """The per-class IoU of the EMA weights where they are the ones compared: a training run of an EMA row (or of
    a row since removed) that has them."""
    if isinstance(record, TrainRecord) and record.per_class_iou_ema and (spec is None or spec.columns.ema):
        return record.per_class_iou_ema
    return None


def record_versions(record: ResultRecord) -> dict[str, str]:
    versions = {name: _text(v) for name, v in record.versions.items()}
    versions["git_commit"] = _text(record.git_commit)
    env = record.environment
    versions.update({f"env.{name}": _text(env[name]) for name in ENVIRONMENT_FIELDS if name in env})
    return versions


def folder_recipe(folder: Path) -> dict[str, str]:
    """The plan a run folder's journal holds (the params every run logs at its start)."""
    if not Journal.exists(folder / JOURNAL_DIR):
        return {}
    params = Journal(folder / JOURNAL_DIR).params()
    return {k: _text(v) for k, v in params.items() if k in PLAN_FIELDS}


def record_recipe(record: ResultRecord) -> dict[str, str]:
    """The record's resolved plan, and a training run's starting weights."""
    recipe = {k: _text(v) for k, v in record.plan.items() if k in PLAN_FIELDS}
    if isinstance(record, TrainRecord):
        recipe["starting_weights"] = _text(record.starting_weights)
    return recipe


def from_record(record: ResultRecord, label: str, source: str = "result record") -> Comparable:
    spec = _spec(record.row)
    ema = _ema_per_class(spec, record)
    if isinstance(record, TrainRecord) and spec is not None:
        headline = _number(measured_miou(spec, record))
    else:
        headline = _number(record.miou)
    if isinstance(record, TrainRecord):
        miou, weights = (record.miou_ema, "ema") if ema is not None else (record.miou, "raw")
    else:
        miou, weights = record.miou, record.weights
    per_class = ema if ema is not None else record.per_class_iou
    return Comparable(label=label, source=source, row=record.row, dataset=record.dataset, headline=headline,
                      miou=_number(miou), weights=weights,
                      per_class={name: _number(per_class.get(name)) for name in CLASS_NAMES},
                      recipe=record_recipe(record), versions=record_versions(record))


def record_of_folder(folder: RunFolder) -> ResultRecord:
    """The result record a finished run folder wrote: the one run.json names, else the record of its MLflow run or
    its checkpoints (older folders)."""
    named = folder.info.get("record")
    if named and Path(named).is_file():
        return read_record(Path(named))
    run_id = folder.tracking_run_id
    inside = str(folder.path.resolve()) + "/"
    for record in load_records(dataset=folder.info.get("dataset")):
        if run_id and record.tracking_run_id == run_id:
            return record
        if str(Path(record.checkpoint).resolve()).startswith(inside):
            return record
    raise BenchError(f"run folder {folder.path} has no result record (its status is {folder.status}); compare "
                     "finished runs, or give their result records")


def from_run_folder(path: Path, label: str) -> Comparable:
    folder = RunFolder.open(path)
    item = from_record(record_of_folder(folder), label, "run folder")
    recipe = folder_recipe(path)
    item.recipe = {**recipe, **item.recipe} if recipe else item.recipe
    return item


def from_mlflow(run_id: str, label: str, tracking_uri: str) -> Comparable:
    """An MLflow run: its result record when the store names one that is still there, else what MLflow holds (the
    params are the plan, `val_iou[_ema]/<class>` the per-class IoU; no package versions)."""
    from harness.tracking.backends import read_run

    run = read_run(tracking_uri, run_id)
    if run is None:
        raise BenchError(f"bench compare: {label!r} is no MLflow run in {tracking_uri}; give a run id of that store "
                         "(or --tracking-uri the store it is in)")
    tags, metrics, params = run.tags, run.metrics, run.params
    recorded = tags.get("result_record")
    if recorded and Path(recorded).is_file():
        item = from_record(read_record(Path(recorded)), label, "MLflow run")
        item.recipe = {**{k: v for k, v in params.items() if k in PLAN_FIELDS}, **item.recipe}
        return item
    row = tags.get("row", "?")
    spec = _spec(row)
    ema = any(k.startswith(grouped(per_class_group("ema"), "")) for k in metrics) and (spec is None or spec.columns.ema)
    group = per_class_group("ema" if ema else "raw")
    recipe = {k: v for k, v in params.items() if k in PLAN_FIELDS}
    if "starting_weights" in tags:
        recipe["starting_weights"] = tags["starting_weights"]
    versions = {"git_commit": tags.get(GIT_COMMIT, "unknown")
                + ("-dirty" if tags.get("git_dirty") == "true" else "")}
    return Comparable(label=label, source="MLflow run (no result record)", row=row,
                      dataset=tags.get("dataset", "?"), headline=_number(metrics.get("miou")),
                      miou=_number(metrics.get(f"final/miou{'_ema' if ema else ''}", metrics.get("miou"))),
                      weights="ema" if ema else "raw",
                      per_class={name: _number(metrics.get(f"{group}/{class_key(name)}")) for name in CLASS_NAMES},
                      recipe=recipe, versions=versions)


def _agreed(values: list[str]) -> str:
    distinct = list(dict.fromkeys(values))
    return distinct[0] if len(distinct) == 1 else "mixed: " + ", ".join(distinct)


def from_row(row: str, dataset: str) -> Comparable:
    """A row: its counted runs averaged (on Cityscapes, the records `bench table` counts; on the synthetic data,
    where nothing counts, every training record of the row)."""
    spec = load_spec(row)
    runs_of = base_row(row)
    training = [r for r in load_records(dataset=dataset) if isinstance(r, TrainRecord) and r.row == runs_of]
    counted = [r for r in training if standing(spec, r).counts] if dataset == REFERENCE_DATASET else training
    if not counted:
        what = "counted runs" if dataset == REFERENCE_DATASET else "training records"
        raise BenchError(f"bench compare: row {row!r} has no {what} on {dataset} under {results_dir()} "
                         f"({len(training)} record(s) of {runs_of}; see `bench table --all`)")
    items = [from_record(r, r.path or "?") for r in counted]

    def mean(values: list[Optional[float]]) -> Optional[float]:
        defined = [v for v in values if v is not None]
        return statistics.fmean(defined) if defined else None

    keys = lambda attr: sorted({k for item in items for k in getattr(item, attr)})  # noqa: E731
    return Comparable(
        label=row, source=f"row ({len(items)} {'counted ' if dataset == REFERENCE_DATASET else ''}run(s) on {dataset}, "
                          "averaged)",
        row=row, dataset=dataset, headline=mean([i.headline for i in items]), miou=mean([i.miou for i in items]),
        weights=_agreed([i.weights for i in items]),
        per_class={name: mean([i.per_class[name] for i in items]) for name in CLASS_NAMES},
        recipe={k: _agreed([i.recipe.get(k, NOT_RECORDED) for i in items]) for k in keys("recipe")},
        versions={k: _agreed([i.versions.get(k, NOT_RECORDED) for i in items]) for k in keys("versions")},
        runs=len(items))


def load_comparable(argument: str, tracking_uri: str, dataset: str = REFERENCE_DATASET) -> Comparable:
    """A run folder, a result record (.json), a row id or an MLflow run id, in that order of precedence."""
    path = Path(argument).expanduser()
    if path.is_dir():
        if not RunFolder.is_run_folder(path):
            raise BenchError(f"bench compare: {argument} is a folder but no run folder (no {RUN_FILE}); give "
                             "runs/<dataset>/<row>/<stamp>")
        return from_run_folder(path, argument)
    if path.is_file():
        if path.suffix != ".json":
            raise BenchError(f"bench compare: {argument} is neither a run folder nor a result record (.json)")
        return from_record(read_record(path), argument)
    if (experiments_dir() / f"{argument}.yaml").is_file():
        return from_row(argument, dataset)
    if MLFLOW_RUN_ID.fullmatch(argument):
        return from_mlflow(argument, argument, tracking_uri)
    raise BenchError(f"bench compare: {argument!r} is neither a run folder, a result record (.json), a row (see "
                     "`bench list`) nor an MLflow run id")


# --- the comparison ---------------------------------------------------------------------------------------------


def _differences(items: list[Comparable], attr: str) -> dict[str, list[str]]:
    keys = sorted({k for item in items for k in getattr(item, attr)})
    table = {k: [getattr(item, attr).get(k, NOT_RECORDED) for item in items] for k in keys}
    return {k: values for k, values in table.items() if len(set(values)) > 1}


def gap(values: list[Optional[float]]) -> Optional[float]:
    """Two sides: the second minus the first; more: the largest minus the smallest. None if any is undefined."""
    if any(v is None for v in values):
        return None
    defined = [v for v in values if v is not None]
    return defined[1] - defined[0] if len(defined) == 2 else max(defined) - min(defined)


UNKNOWN_DATASETS = {"?", "None", ""}  # an MLflow run without its dataset tag, a record without the field


def check_one_dataset(items: list[Comparable]) -> None:
    """Refuse runs of different datasets: the same class name scores different images (the synthetic dataset's
    drawn shapes, Cityscapes' street scenes), so every per-class gap, sorted largest first, would read as a finding
    and be none. A one-line warning above that table would still leave the table to be read; no use of
    `bench compare` needs such a gap."""
    known = {item.dataset for item in items} - UNKNOWN_DATASETS
    if len(known) > 1:
        sides = ", ".join(f"{item.label} on {item.dataset}" for item in items)
        raise BenchError(f"bench compare: {sides}: per-class IoU of different datasets scores different images; "
                         "compare runs of one dataset (for rows, pass --dataset)")


def comparison(items: list[Comparable]) -> dict[str, Any]:
    """Everything `bench compare` shows, as plain data (what --json prints); runs of one dataset only."""
    check_one_dataset(items)
    gaps = {name: gap([i.per_class[name] for i in items]) for name in CLASS_NAMES}
    # Largest gap first; classes undefined on a side last, in class order.
    order = sorted(CLASS_NAMES, key=lambda name: (gaps[name] is None, -abs(gaps[name] or 0.0)))
    classes = [{"class": name, "iou": [i.per_class[name] for i in items], "gap": gaps[name]} for name in order]
    return {
        "runs": [asdict(item) for item in items],
        "gap": "second minus first" if len(items) == 2 else "largest minus smallest",
        "headline_miou": [i.headline for i in items], "miou": [i.miou for i in items],
        "classes": classes,
        "recipe_differences": _differences(items, "recipe"),
        "version_differences": _differences(items, "versions"),
        "recipe_fields_compared": len({k for i in items for k in i.recipe}),
    }


def _fmt(value: Optional[float], sign: bool = False) -> str:
    return "-" if value is None else (f"{value:+.2f}" if sign else f"{value:.2f}")


def render(result: dict[str, Any]) -> str:
    from tabulate import tabulate

    runs = result["runs"]
    names = [chr(ord("A") + i) if i < 26 else f"R{i}" for i in range(len(runs))]
    legend = [f"{n}: {r['label']} — {r['row']} on {r['dataset']}, {r['source']}; per-class of the {r['weights']} "
              "weights" for n, r in zip(names, runs)]
    gap_name = "gap (B - A)" if len(runs) == 2 else "gap (max - min)"
    rows = [[c["class"], *(_fmt(v) for v in c["iou"]), _fmt(c["gap"], sign=True)] for c in result["classes"]]
    rows.append(["mIoU (final, these weights)", *(_fmt(v) for v in result["miou"]), _fmt(gap(result["miou"]), True)])
    rows.append(["headline mIoU (table statistic)", *(_fmt(v) for v in result["headline_miou"]),
                 _fmt(gap(result["headline_miou"]), True)])
    lines = [*legend, "", "per-class IoU (%), largest gap first:",
             tabulate(rows, headers=["class", *names, gap_name], disable_numparse=True), ""]
    recipe, versions = result["recipe_differences"], result["version_differences"]
    if recipe:
        lines += [f"recipe fields that differ ({len(recipe)} of {result['recipe_fields_compared']}):",
                  tabulate([[k, *v] for k, v in recipe.items()], headers=["field", *names], disable_numparse=True), ""]
    else:
        lines += [f"recipe: the same {result['recipe_fields_compared']} fields", ""]
    if versions:
        lines += [f"versions and environment that differ ({len(versions)}):",
                  tabulate([[k, *v] for k, v in versions.items()], headers=["", *names], disable_numparse=True)]
    else:
        lines += ["versions and environment: the same"]
    return "\n".join(lines)


def to_json(result: dict[str, Any]) -> str:
    return json.dumps(result, indent=2, allow_nan=False)
