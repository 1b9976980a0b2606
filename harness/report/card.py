"""A run's reproduction card, `report.md`: one plain-markdown document another lab can read to judge a run: the row
and its verdict against the reference, the counting rule's decision, the starting weights with their checksums, the
resolved recipe beside United-Perception's config values, the environment, the time it took, the curves and the
per-class IoU. Written when a run finishes (harness.report.finish) and by `bench report RUN` for older runs."""

from __future__ import annotations

import hashlib
import json
import math
import statistics
from pathlib import Path
from typing import Any, Optional

from harness.config.benchmark import OFFICIAL_SPLIT_IMAGES, REFERENCE_DATASET, SYNTHETIC_DATASET
from harness.config.spec import Spec
from harness.config.up_configs import TABLE_WINS, config_name, config_path, read_config, up_base_row, up_values
from harness.data.cityscapes import CLASS_NAMES
from harness.models.weights import expected_files
from harness.report.records import PACKAGES, EvalRecord, ResultRecord, TrainRecord
from harness.report.verdicts import judge, measured_miou, resolve_tolerance, standing

CARD = "report.md"
# The figures a run logs (harness.report.finish), relative to its artifact root.
CURVES, PER_CLASS_CHART = "plots/training_curves.png", "plots/per_class_iou.png"
# Plan fields the synthetic budget sets (harness.config.plan.synthetic_budget) instead of UP's recipe.
SYNTHETIC_FIELDS = {"iters", "iters_per_epoch", "batch_size", "crop_size", "test_size", "scale_range", "lr",
                    "warmup_iters", "ema_decay", "ema_ramp", "ohem_min_kept", "loss_group_images", "eval_every"}
_CHUNK = 1 << 20


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_checksums(paths: list[tuple[str, Path]]) -> list[dict[str, Any]]:
    """(what, path) -> [{what, path, bytes, sha256}], None for a file that is not there."""
    out = []
    for what, path in paths:
        present = path.is_file()
        out.append({"what": what, "path": str(path), "bytes": path.stat().st_size if present else None,
                    "sha256": sha256(path) if present else None})
    return out


def weight_files(spec: Spec, record: ResultRecord) -> list[dict[str, Any]]:
    """The files a run's weights came from, with checksums: the starting-weight file of a training run, the
    checkpoint an evaluation scored."""
    if isinstance(record, EvalRecord):
        return file_checksums([("checkpoint", Path(record.checkpoint))])
    return file_checksums(expected_files(spec))


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value).replace("|", "\\|")


def _table(headers: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return lines + [""]


def _same(ours: Any, theirs: Any) -> bool:
    if isinstance(ours, (int, float)) and isinstance(theirs, (int, float)) and not isinstance(ours, bool):
        return abs(float(ours) - float(theirs)) <= 1e-9 * max(1.0, abs(float(theirs)))
    if isinstance(ours, list) and isinstance(theirs, list) and len(ours) == len(theirs):
        return all(_same(a, b) for a, b in zip(ours, theirs))
    return bool(ours == theirs)


def recipe_section(spec: Spec, record: ResultRecord, reference_root: Optional[Path] = None) -> list[str]:
    """The resolved plan field by field beside the value UP's config gives it, and why a value differs."""
    plan = record.plan
    lines = ["## Recipe: this run beside United-Perception's config", ""]
    path = config_path(spec, reference_root)
    config = read_config(spec, reference_root)
    if path is None:
        lines += ["UP has no config for this row (one of our rows): the resolved recipe alone.", ""]
    elif config is None:
        lines += [f"UP config not available: `{path}` is not beside this checkout (the reference material); "
                  "the resolved recipe alone.", ""]
    else:
        lines += [f"UP's values from `configs/seg/{config_name(spec)}.yaml` (UP at c477a744); `=` marks a field "
                  "that matches.", ""]
    # UP's epochs become iterations over the train split: the run's own, or (an evaluation) the official one
    train_images = record.train_images if isinstance(record, TrainRecord) else 0
    theirs = up_values(spec, config, train_images or OFFICIAL_SPLIT_IMAGES["train"]) if config is not None else {}
    wins = TABLE_WINS.get(up_base_row(spec.row), {})
    synthetic = record.dataset == SYNTHETIC_DATASET
    starting = spec.model.init_checkpoint or spec.model.backbone_checkpoint
    fields = [(k, v) for k, v in plan.items() if k != "row"] + [("starting_weights", starting)]
    rows = []
    for name, ours in fields:
        if name not in theirs:
            rows.append([name, ours, "", "not in UP's config" if config is not None else ""])
            continue
        up = theirs[name]
        if up is None and not plan.get("ema") and name in ("ema_decay", "ema_ramp"):
            rows.append([name, ours, up, "unused (no EMA)"])
            continue
        if _same(ours, up):
            note = "="
        elif name in ("iters",) and "epochs" in wins:
            note = f"the table's {spec.columns.epochs} epochs win (see the spec)"
        elif name == "crop_size" and "crop" in wins:
            note = "the row's own crop wins (see the spec)"
        elif name == "starting_weights" and spec.row.endswith("-mseg"):
            note = "the MSeg-trained whole model (the row's own start)"
        elif synthetic and name in SYNTHETIC_FIELDS:
            note = "synthetic budget (CPU-sized)"
        elif name == "iters" and record.dataset == REFERENCE_DATASET:
            note = "--iters (not the planned budget)"
        else:
            note = "differs"
        rows.append([name, ours, up, note])
    return lines + _table(["field", "this run", "UP config", "note"], rows)


def _processes(record: ResultRecord) -> int:
    """The processes the run took: a training's, or the one of an evaluation."""
    return record.devices if isinstance(record, TrainRecord) else 1


def environment_section(record: ResultRecord) -> list[str]:
    env, versions, commit = record.environment, record.versions, record.git_commit
    dirty = commit.endswith("-dirty")
    gpu = env.get("gpu")
    rows: list[list[Any]] = [
        ["device", f"{env.get('device_type')} x {_processes(record)} process(es)"],
        ["GPU", f"{gpu} (x{env.get('gpu_count')} on this machine)" if gpu else "none (CPU run)"],
        ["NVIDIA driver", env.get("driver")], ["CUDA (PyTorch build)", env.get("cuda_build")],
        ["cuDNN", env.get("cudnn")], ["CPU", f"{env.get('cpu')} ({env.get('cpu_count')} cores)"],
        ["OS", env.get("os")]]
    rows += [["precision", record.precision]]
    rows += [[name, versions[name]] for name in ("python", *PACKAGES) if name in versions]
    rows += [["commit", commit.removesuffix("-dirty")],
             ["uncommitted changes", "yes (dirty)" if dirty else "no" if commit != "unknown" else "unknown"]]
    return ["## Environment", ""] + _table(["", ""], rows)


def time_section(record: ResultRecord) -> list[str]:
    wall = record.wall_time_s
    processes = _processes(record)
    hours, rest = divmod(int(round(wall)), 3600)
    on_gpu = record.environment.get("device_type", record.device) == "cuda"
    rows: list[list[Any]] = [["wall time", f"{hours}:{rest // 60:02d}:{rest % 60:02d} ({wall:g} s)"],
            ["GPU-hours", f"{wall * processes / 3600:.3f} ({processes} GPU(s))" if on_gpu else "0 (a CPU run)"]]
    iterations = record.iterations if isinstance(record, TrainRecord) else None
    if iterations:
        rows.append(["iterations", f"{iterations} ({iterations / wall:.2f} it/s)" if wall else iterations])
    return ["## Time", ""] + _table(["", ""], rows)


def per_class_section(record: ResultRecord) -> list[str]:
    """Each column is the weights it names: a training run's raw weights (their final mIoU is `miou_final`) beside
    its EMA weights (`miou_ema`); an evaluation's the weights it scored. The headline (`miou`, the best evaluation of
    the row's weights) is in the verdict section, not here."""
    raw = record.per_class_iou
    if isinstance(record, TrainRecord):
        first, final, ema, ema_final = "IoU (raw weights)", record.miou_final, record.per_class_iou_ema, record.miou_ema
    else:
        first, final, ema, ema_final = f"IoU ({record.weights} weights)", record.miou, None, None
    headers = ["class", first] + (["IoU (EMA weights)"] if ema else [])

    def iou(value: Optional[float]) -> str:
        return "-" if value is None or math.isnan(value) else f"{value:.2f}"

    rows = [[name, iou(raw[name]), *([iou(ema.get(name))] if ema else [])] for name in CLASS_NAMES if name in raw]
    rows.append(["**mIoU** (final evaluation)", iou(final), *([iou(ema_final)] if ema else [])])
    return (["## Per-class IoU (%)", "", "Of the final evaluation; `-`: a class absent from both the ground truth and "
             "the prediction (undefined, left out of the mean)."] + [""] + _table(headers, rows))


def reproduction_card(spec: Spec, record: ResultRecord, *, figures: str = "", figure_names: tuple[str, ...] = (),
                      tolerance: Optional[float] = None, reference_root: Optional[Path] = None,
                      weights: Optional[list[dict[str, Any]]] = None) -> str:
    """The card of the run whose result record is `record`. `figures` prefixes the figures' paths (they live in
    the run's artifact root), `figure_names` the figures the run has; `weights` the checksummed weight files
    (default: computed now)."""
    is_eval = isinstance(record, EvalRecord)
    headline = measured_miou(spec, record) if isinstance(record, TrainRecord) else record.miou
    statistic = ("mIoU of the evaluated weights" if is_eval else
                 f"best evaluation of the {'EMA' if spec.columns.ema else 'raw'} weights (UP's auto_save_best)")
    reference = list(spec.reference.miou)
    tol = resolve_tolerance(tolerance)
    lines = [f"# Reproduction card: {spec.row}", "",
             f"{'Evaluation' if is_eval else 'Training'} run on **{record.dataset}**, finished "
             f"{record.time}; tracking run `{record.tracking_run_id or 'none (offline)'}`; result "
             f"record `{record.path or '?'}`.", ""]

    lines += ["## Row and verdict", ""]
    if reference and record.dataset != REFERENCE_DATASET:
        lines += [f"{headline:.2f} mIoU ({statistic}) on the {record.dataset} data: no reference, no Δ and no "
                  f"verdict (the table measured Cityscapes; a run on other data proves the pipeline, it is never a "
                  "reproduction).", ""]
    elif reference:
        ref_mean = statistics.fmean(reference)
        verdict = judge(reference, [headline], tol)
        lines += _table(["row", "reference mIoU", "this run", "Δ", "verdict (this run alone)"],
                        [[spec.row, " \\| ".join(repr(v) for v in reference), f"{headline:.2f}",
                          f"{headline - ref_mean:+.2f}", verdict]])
        lines += [f"The headline is the {statistic}. Verdict: within {tol:g} mIoU of the reference mean or inside "
                  "the reference's own span is *reproduced*; the table's verdict averages every counted run "
                  "(`bench check`).", ""]
    else:
        lines += [f"{spec.row} has no reference figure (one of our rows): {headline:.2f} mIoU ({statistic}), no "
                  "verdict.", ""]

    decision = standing(spec, record)
    lines += ["## Counting rule", ""]
    if decision.counts and isinstance(record, TrainRecord):
        lines += [f"**Counts** as a reproduction of {spec.row}: the full planned budget ({record.iterations} "
                  "iterations), Cityscapes with the official 2975 / 500 split, from the row's expected starting "
                  "weights.", ""]
    else:
        lines += [f"**Does not count** ({decision.kind}): {decision.reason}. The table lists it apart and never "
                  "averages it into the measured column.", ""]

    lines += ["## Weights", ""]
    files = weights if weights is not None else weight_files(spec, record)
    if isinstance(record, EvalRecord):
        lines += [f"Scored the **{record.weights}** weights of the checkpoint below.", ""]
    else:
        lines += [f"Starting weights: {record.starting_weights}.", ""]
    if files:
        lines += _table(["file", "role", "bytes", "sha256"],
                        [[f"`{f['path']}`", f["what"], f.get("bytes"), f"`{f['sha256']}`" if f["sha256"] else
                          "not there"] for f in files])
    else:
        lines += ["The row names no starting-weight file (it trains from random weights, as UP's did).", ""]

    lines += recipe_section(spec, record, reference_root)
    lines += environment_section(record)
    lines += time_section(record)

    lines += ["## Curves", ""]
    if CURVES in figure_names:
        lines += [f"![training curves]({figures}{CURVES})", ""]
    else:
        lines += ["No training curves (an evaluation run, or none logged).", ""]
    if PER_CLASS_CHART in figure_names:
        lines += [f"![per-class IoU]({figures}{PER_CLASS_CHART})", ""]
    lines += per_class_section(record)
    return "\n".join(lines).rstrip() + "\n"

