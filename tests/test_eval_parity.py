"""Our per-class IoU and mIoU equal the official Cityscapes evaluator's on the same prediction PNGs."""

from __future__ import annotations

import importlib
import math
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from harness.config.spec import load_spec
from harness.data.cityscapes import CLASS_NAMES, Sample, find_samples
from harness.data.labels import TRAIN_ID_TO_LABEL_ID
from harness.engine.metrics import SegMetrics
from harness.outputs import predictions as export
from harness.outputs.predictions import evaluate_split, score_predictions
from tests.helpers import plan_at

pytest.importorskip("cityscapesscripts")

IGNORED_LABEL_IDS = (0, 1, 2, 3, 4, 5, 6, 9, 10, 14, 15, 16, 18, 29, 30)  # unlabeled, ego vehicle, ..., trailer
MISSING_FROM_GT = 16  # train: predicted now and then, never in the ground truth -> IoU 0
NEVER_PREDICTED = 5  # pole: in the ground truth, never predicted -> IoU 0
IN_NEITHER = 17  # motorcycle: absent from both -> NaN, left out of the mean


@pytest.fixture
def official(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[list[Path], list[Path]], dict]:
    """cityscapesscripts' evaluator, imported with its environment pointing into tmp (it reads it at import)."""
    export_dir = tmp_path / "cs-export"
    export_dir.mkdir()
    monkeypatch.setenv("CITYSCAPES_DATASET", str(tmp_path / "cs-dataset"))
    monkeypatch.setenv("CITYSCAPES_RESULTS", str(tmp_path / "cs-results"))
    monkeypatch.setenv("CITYSCAPES_EXPORT_DIR", str(export_dir))
    module = importlib.reload(importlib.import_module("cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling"))
    assert str(tmp_path) in module.args.exportFile  # nothing it could write lands in the repo

    def run(predictions: list[Path], ground_truth: list[Path]) -> dict:
        args = module.args
        # Instance-level scores need *_instanceIds.png files the generated data has no use for.
        args.evalInstLevelScore, args.evalPixelAccuracy, args.JSONOutput, args.quiet = False, False, False, True
        return module.evaluateImgLists([str(p) for p in predictions], [str(g) for g in ground_truth], args)

    yield run
    assert not any(export_dir.iterdir())


def assert_parity(ours: SegMetrics, theirs: dict) -> None:
    for train_id, name in enumerate(CLASS_NAMES):
        mine, official_iou = ours.iou[train_id] / 100, theirs["classScores"][name]
        if math.isnan(official_iou):
            assert math.isnan(mine), name
        else:
            assert abs(mine - official_iou) < 1e-6, (name, mine, official_iou)
    assert abs(ours.miou / 100 - theirs["averageScoreClasses"]) < 1e-6, (ours.miou, theirs["averageScoreClasses"])


def generated_split(root: Path, rng: np.random.Generator) -> list[tuple[Sample, np.ndarray]]:
    """Ground truth in labelIds (ignored regions included) and trainId predictions that are often right."""
    gt_classes = [t for t in range(19) if t not in (MISSING_FROM_GT, IN_NEITHER)]
    predicted = [t for t in range(19) if t not in (NEVER_PREDICTED, IN_NEITHER)]
    pairs = []
    for i, (width, height) in enumerate([(48, 24), (37, 19), (64, 32)]):
        city = ("aachen", "bremen")[i % 2]
        stem = f"{city}_{i:06d}_000019"
        train_ids = rng.choice(gt_classes, size=(height, width))
        # Blocks of ignored labels, as ego vehicle or rectification border would be.
        label_ids = np.asarray(TRAIN_ID_TO_LABEL_ID, dtype=np.uint8)[train_ids]
        label_ids[: height // 4, : width // 3] = rng.choice(IGNORED_LABEL_IDS, size=(height // 4, width // 3))
        label_ids[-2:, :] = 1
        prediction = np.where(rng.random((height, width)) < 0.6, train_ids, rng.choice(predicted, size=(height, width)))
        prediction[prediction == NEVER_PREDICTED] = 0
        image = root / "leftImg8bit" / "val" / city / f"{stem}_leftImg8bit.png"
        label = root / "gtFine" / "val" / city / f"{stem}_gtFine_labelIds.png"
        for path, array in ((image, np.zeros((height, width, 3), np.uint8)), (label, label_ids)):
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(array).save(path)
        pairs.append((Sample(image, label), prediction.astype(np.uint8)))
    return pairs


def test_per_class_iou_and_miou_equal_the_official_evaluator(tmp_path: Path, official):
    pairs = generated_split(tmp_path / "data", np.random.default_rng(0))
    samples = [s for s, _ in pairs]
    pred_dir = tmp_path / "predictions"
    paths = [export.save_prediction(p, export.prediction_path(pred_dir, s)) for s, p in pairs]

    ours = score_predictions(samples, pred_dir)
    theirs = official(paths, [s.label for s in samples])
    assert_parity(ours, theirs)
    # The generated data really has the corner cases this test is about.
    assert ours.iou[MISSING_FROM_GT] == 0 and ours.iou[NEVER_PREDICTED] == 0 and math.isnan(ours.iou[IN_NEITHER])
    assert sum(not math.isnan(v) for v in ours.iou) == 18 and 20 < ours.miou < 80


def test_a_predicted_label_outside_the_19_classes_is_scored_as_the_official_evaluator_does(tmp_path: Path, official):
    pairs = generated_split(tmp_path / "data", np.random.default_rng(1))
    pred_dir = tmp_path / "predictions"
    paths = []
    for sample, prediction in pairs:
        label_ids = np.asarray(TRAIN_ID_TO_LABEL_ID, dtype=np.uint8)[prediction]
        label_ids[::3, ::2] = 4  # "static": a valid labelId, but not an evaluated class
        path = export.prediction_path(pred_dir, sample)
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(label_ids).save(path)
        paths.append(path)
    ours = score_predictions([s for s, _ in pairs], pred_dir)
    assert_parity(ours, official(paths, [s.label for s, _ in pairs]))


def test_evaluate_split_agrees_with_the_official_evaluator_on_its_saved_predictions(
        synthetic_root: Path, tmp_path: Path, official):
    spec = load_spec("deeplabv3-r50")
    samples = find_samples(synthetic_root, "val")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 19, 1))
    pred_dir = tmp_path / "predictions"
    # Inference below ground-truth size, so the resize to ground truth is part of what is checked.
    metrics = evaluate_split(model, samples, plan_at(spec, [128, 64]), torch.device("cpu"),
                             save_predictions_dir=pred_dir, workers=0, progress=False)
    paths = [export.prediction_path(pred_dir, s) for s in samples]
    assert all(p.is_file() for p in paths)
    theirs = official(paths, [s.label for s in samples])
    assert_parity(metrics, theirs)
    assert_parity(score_predictions(samples, pred_dir), theirs)
    assert sum(v > 0 for v in metrics.iou if not math.isnan(v)) >= 2  # more than one class ever right
