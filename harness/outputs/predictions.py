"""Prediction files in the form the official Cityscapes evaluator and test server take.

One single-channel PNG of labelIds (not trainIds) per image, at ground-truth size, named exactly
like its image and kept in a folder per city:

    <out>/<city>/<city>_<seq>_<frame>_leftImg8bit.png

The official evaluator finds a prediction by the pattern `<city>_<seq>_<frame>*.png` anywhere under
its results folder, and the test server takes a zip of one such file per test image, so this one
layout serves `--save-predictions`, the official evaluator and a submission alike.

`evaluate_split` and `predict_split` run the one evaluation loop (harness.engine.evaluate) over a split with these
files and image panels (harness.outputs.panels) as its sinks.
"""

from __future__ import annotations

import math
import os
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image

from harness.config.plan import TrainPlan, size_pair
from harness.cores import loader_workers
from harness.data.augment import EvalTransform
from harness.data.cityscapes import NUM_CLASSES, Sample, load_train_ids
from harness.data.labels import LABEL_TO_TRAIN, train_ids_to_label_ids
from harness.data.loaders import eval_loader
from harness.engine.evaluate import Reduce, Scored, Sink, TestMode, evaluate
from harness.engine.metrics import ConfusionMatrix, SegMetrics
from harness.errors import BenchError
from harness.files import atomic_output, new_temporary_file
from harness.outputs.panels import PanelWriter, panel_indices
from harness.paths import runs_dir


def prediction_path(out_dir: Path, sample: Sample) -> Path:
    """Where the prediction for `sample` lives under `out_dir`."""
    return Path(out_dir) / sample.city / sample.image.name


def save_prediction(train_ids: np.ndarray | torch.Tensor, path: Path) -> Path:
    """Write an HxW map of trainIds (0..18) as a labelId PNG at `path`; returns `path`."""
    if isinstance(train_ids, torch.Tensor):
        train_ids = train_ids.detach().cpu().numpy()
    train_ids = np.asarray(train_ids)
    if train_ids.ndim != 2:
        raise ValueError(f"a prediction is one HxW map of trainIds, got shape {train_ids.shape}")
    if train_ids.size and (train_ids.min() < 0 or train_ids.max() >= NUM_CLASSES):
        raise ValueError(f"trainIds must lie in 0..{NUM_CLASSES - 1}, got {train_ids.min()}..{train_ids.max()}")
    label_ids = train_ids_to_label_ids(train_ids.astype(np.uint8))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write beside the target, then rename: an interrupted run never leaves a truncated PNG that
    # a later zip or evaluation would pick up as a prediction.
    fd, tmp = new_temporary_file(path.parent, prefix=".tmp-", suffix=".png")
    try:
        with os.fdopen(fd, "wb") as handle:
            Image.fromarray(label_ids).save(handle, format="PNG")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def read_prediction(path: Path, size: Optional[tuple[int, int]] = None) -> np.ndarray:
    """The labelIds of one prediction PNG as an HxW uint8 array; `size` is the expected (width, height)."""
    path = Path(path)
    if not path.is_file():
        raise BenchError(f"missing prediction {path}; write predictions with `bench eval --save-predictions DIR`")
    try:
        with Image.open(path) as img:
            img.load()
            mode, img_size = img.mode, img.size
            array = np.asarray(img)
    except (OSError, ValueError, SyntaxError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BenchError(f"corrupt prediction {path} ({reason}); delete it and write the predictions again") from None
    if mode != "L":
        raise BenchError(f"prediction {path} has image mode {mode}; expected one channel of 8-bit labelIds (mode L)")
    if size is not None and tuple(img_size) != tuple(size):
        raise BenchError(f"prediction {path} is {img_size[0]}x{img_size[1]}, but its ground truth is "
                         f"{size[0]}x{size[1]}; predictions must be at ground-truth size")
    return array


def read_prediction_train_ids(path: Path, size: Optional[tuple[int, int]] = None) -> np.ndarray:
    """A prediction PNG mapped back to trainIds; labelIds outside the 19 classes become 255."""
    return LABEL_TO_TRAIN[read_prediction(path, size)]


def check_prediction(path: Path) -> None:
    """Raise a one-line BenchError unless `path` is a readable single-channel PNG (CRCs checked)."""
    path = Path(path)
    if not path.is_file():
        raise BenchError(f"missing prediction {path}; write predictions with `bench predict --split test --out DIR`")
    try:
        with Image.open(path) as img:
            mode, fmt = img.mode, img.format
            img.verify()
    except (OSError, ValueError, SyntaxError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BenchError(f"corrupt prediction {path} ({reason}); delete it and write the predictions again") from None
    if fmt != "PNG" or mode != "L":
        raise BenchError(f"prediction {path} is a {fmt} image of mode {mode}; expected a single-channel PNG of "
                         "labelIds")


def predictions_dir(checkpoint: Path, split: str, weights: str) -> Path:
    """Where `bench predict` writes by default: beside the checkpoint's run folder (runs/<dataset>/<row>/<stamp>/
    predictions/<split>-<weights>/), or under runs/predictions/ for a checkpoint outside a run folder; never the
    working directory, so that a checkout stays clean."""
    checkpoint = Path(checkpoint).resolve()
    if checkpoint.parent.name == "checkpoints":
        return checkpoint.parent.parent / "predictions" / f"{split}-{weights}"
    return runs_dir() / "predictions" / f"{checkpoint.stem}-{split}-{weights}"


def make_submission_zip(folder: Path, zip_path: Path, samples: Optional[Sequence[Sample]] = None) -> Path:
    """Pack the predictions under `folder` into the zip the Cityscapes test server takes.

    With `samples`, exactly their predictions go in (one per image; a missing one is an error, stray
    files are left out); without, every PNG under `folder`. Entries keep their `<city>/<name>` path.
    """
    folder, zip_path = Path(folder), Path(zip_path)
    if not folder.is_dir():
        raise BenchError(f"prediction folder {folder} does not exist; write predictions with `bench predict --out DIR`")
    if samples is not None:
        files = [prediction_path(folder, sample) for sample in samples]
    else:
        files = sorted(p for p in folder.rglob("*.png") if not p.name.startswith(".tmp-"))
    if not files:
        raise BenchError(f"no prediction PNGs under {folder}; write predictions with `bench predict --out DIR`")
    for path in files:
        check_prediction(path)
    # The server matches each image by `<city>_<seq>_<frame>*.png`; two files for one image are rejected.
    seen: dict[str, Path] = {}
    for path in files:
        key = "_".join(path.name.split("_")[:3])
        if key in seen:
            raise BenchError(f"two predictions for image {key} ({seen[key]} and {path}); keep one")
        seen[key] = path
    zip_path.parent.mkdir(parents=True, exist_ok=True)
    # PNGs are already compressed: storing them is as small and much faster than deflating again.
    with atomic_output(zip_path) as f, zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED) as archive:
        for path in files:
            archive.write(path, path.relative_to(folder).as_posix())
    return zip_path


# --- the evaluation loop's file sinks ------------------------------------------------------------------------


class PredictionWriter:
    """Writes each prediction as the official evaluator and the test server read it."""

    def __init__(self, out_dir: Path):
        self.out_dir = Path(out_dir)
        self.written: list[Path] = []

    def __call__(self, scored: Scored) -> None:
        prediction = scored.prediction.cpu().numpy().astype(np.uint8)
        self.written.append(save_prediction(prediction, prediction_path(self.out_dir, scored.sample)))


def default_workers(device: torch.device) -> int:
    """Decoding processes for `bench eval` / `predict`: on a GPU every core but the loop's (the forward outruns
    one decoder several times over), on the CPU at most two, which the model's own threads leave room for."""
    workers = loader_workers(1)
    return workers if torch.device(device).type == "cuda" else min(2, workers)


def _split_setup(plan: TrainPlan) -> tuple[EvalTransform, TestMode]:
    return EvalTransform(size_pair(plan.test_size), tuple(plan.mean), tuple(plan.std)), TestMode.from_plan(plan)


def evaluate_split(model: torch.nn.Module, samples: Sequence[Sample], plan: TrainPlan, device: torch.device, *,
                   mode: Optional[TestMode] = None, save_predictions_dir: Optional[Path] = None,
                   panels_dir: Optional[Path] = None, num_panels: int = 4, num_classes: int = NUM_CLASSES,
                   workers: Optional[int] = None, progress: bool = True, desc: str = "eval",
                   reduce: Optional[Reduce] = None) -> SegMetrics:
    """One model on labelled samples at the plan's test size, in its test mode (or `mode`), in its precision,
    scored at ground-truth size. With `save_predictions_dir`, each prediction is also written as the official
    evaluator reads it; with `panels_dir`, `num_panels` images spread over the split become image / ground truth /
    prediction panels."""
    transform, plan_mode = _split_setup(plan)
    sinks: list[Sink] = []
    if save_predictions_dir is not None:
        sinks.append(PredictionWriter(save_predictions_dir))
    if panels_dir is not None:
        sinks.append(PanelWriter(panels_dir, panel_indices(len(samples), num_panels)))
    loader = eval_loader(samples, device, default_workers(device) if workers is None else workers)
    return evaluate({"model": model}, loader, device, transform, mode=mode or plan_mode, precision=plan.precision,
                    num_classes=num_classes, reduce=reduce, sinks=sinks, progress=progress, desc=desc)["model"]


def predict_split(model: torch.nn.Module, samples: Sequence[Sample], plan: TrainPlan, device: torch.device,
                  out_dir: Path, *, workers: Optional[int] = None, progress: bool = True,
                  desc: str = "predict") -> list[Path]:
    """Write one labelId PNG per sample under `out_dir` (labels not needed: the test split); returns the paths."""
    transform, mode = _split_setup(plan)
    writer = PredictionWriter(out_dir)
    loader = eval_loader(samples, device, default_workers(device) if workers is None else workers)
    evaluate({"model": model}, loader, device, transform, mode=mode, precision=plan.precision, sinks=[writer],
             score=False, progress=progress, desc=desc)
    return writer.written


def score_predictions(samples: Sequence[Sample], predictions_dir: Path, num_classes: int = NUM_CLASSES,
                      device: torch.device | str = "cpu") -> SegMetrics:
    """Score saved prediction PNGs against the samples' ground truth, as the official evaluator does.

    A predicted labelId outside the evaluated classes is wrong for its pixel (a false negative of the
    true class) without being a false positive of any class, exactly as in cityscapesscripts.
    """
    void = num_classes  # one extra prediction column for such labelIds; no ground truth ever lands in it
    matrix = ConfusionMatrix(num_classes + 1, device=device)
    for sample in samples:
        if sample.label is None:
            raise BenchError(f"no ground truth for {sample.image}; score predictions on a labelled split (val)")
        label = load_train_ids(sample.label)
        height, width = label.shape
        predicted = read_prediction_train_ids(prediction_path(predictions_dir, sample), (width, height))
        prediction = torch.from_numpy(predicted.astype(np.int64))
        prediction[prediction >= num_classes] = void
        matrix.update(prediction.to(device), label.to(device))
    return _drop_void_column(matrix.matrix, num_classes)


def _drop_void_column(matrix: torch.Tensor, num_classes: int) -> SegMetrics:
    full = SegMetrics.from_matrix(matrix)
    iou = full.iou[:num_classes]  # the void column's own "IoU" is not a class
    present = [v for v in iou if not math.isnan(v)]
    miou = sum(present) / len(present) if present else math.nan
    return SegMetrics(miou=miou, iou=iou, pixel_accuracy=full.pixel_accuracy)
