"""Prediction PNGs, the test-server zip, panels, and one-line errors for bad prediction files."""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from harness.config.spec import load_spec
from harness.data.augment import EvalTransform
from harness.data.cityscapes import PALETTE, decode_image, find_samples, load_train_ids
from harness.data.labels import TRAIN_ID_TO_LABEL_ID
from harness.engine.evaluate import infer_logits
from harness.errors import BenchError
from harness.outputs import panels as visualize
from harness.outputs import predictions as export
from harness.outputs.predictions import evaluate_split, predict_split, score_predictions
from tests.helpers import plan_at


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 19, 1)).eval()


@pytest.fixture
def test_split(synthetic_root: Path, tmp_path: Path) -> Path:
    """The synthetic val images laid out as a test split: images only, no ground truth."""
    root = tmp_path / "cityscapes"
    shutil.copytree(synthetic_root / "leftImg8bit" / "val", root / "leftImg8bit" / "test")
    return root


def one_line_error_naming(path: Path, call) -> str:
    with pytest.raises(BenchError) as err:
        call()
    message = str(err.value)
    assert str(path) in message and "\n" not in message, message
    return message


def test_saved_prediction_holds_label_ids_not_train_ids(tmp_path: Path):
    train_ids = np.arange(19, dtype=np.uint8).repeat(2).reshape(2, 19)
    path = export.save_prediction(train_ids, tmp_path / "city" / "city_000000_000019_leftImg8bit.png")
    with Image.open(path) as img:
        assert img.mode == "L" and img.size == (19, 2)
        stored = np.asarray(img)
    assert stored[0].tolist() == [TRAIN_ID_TO_LABEL_ID[t] for t in train_ids[0]]
    assert (export.read_prediction_train_ids(path) == train_ids).all()
    assert not list(path.parent.glob(".tmp-*"))  # the temporary file was renamed away
    with pytest.raises(ValueError):
        export.save_prediction(np.full((2, 2), 255, np.uint8), tmp_path / "x.png")  # 255 is not a class


def test_test_split_export_round_trips_through_the_submission_zip(test_split: Path, tmp_path: Path):
    spec = load_spec("deeplabv3-r50")
    samples = find_samples(test_split, "test", require_labels=False)
    assert samples and all(s.label is None for s in samples)
    model = tiny_model()
    out = tmp_path / "submission"
    paths = predict_split(model, samples, plan_at(spec, [128, 64]), torch.device("cpu"), out, workers=0, progress=False)

    # One PNG per image, named like its image, in its city's folder, at the image's full size, of labelIds.
    assert paths == [out / s.city / s.image.name for s in samples]
    assert sorted(out.rglob("*.png")) == sorted(paths)
    for sample, path in zip(samples, paths):
        with Image.open(sample.image) as img:
            full_size = img.size
        with Image.open(path) as pred:
            assert pred.mode == "L" and pred.size == full_size == (256, 128)
            label_ids = np.asarray(pred)
        assert set(np.unique(label_ids)) <= set(TRAIN_ID_TO_LABEL_ID)
        # The PNG is exactly the argmax of the model's logits at full size, mapped to labelIds.
        image = EvalTransform((128, 64), tuple(spec.data.mean), tuple(spec.data.std))(decode_image(sample.image), "cpu")
        expected = infer_logits(model, image, (128, 256)).argmax(1)[0].numpy()
        assert (export.read_prediction_train_ids(path) == expected).all()
    assert len(np.unique(export.read_prediction(paths[0]))) > 1

    (out / "notes.txt").write_text("not a prediction")
    stray = out / "elsewhere" / "stray_000000_000000_leftImg8bit.png"
    export.save_prediction(np.zeros((4, 4), np.uint8), stray)
    zip_path = export.make_submission_zip(out, tmp_path / "results.zip", samples)
    with zipfile.ZipFile(zip_path) as archive:
        names = archive.namelist()
        assert names == [f"{s.city}/{s.image.name}" for s in samples]  # stray files stay out
        for name, path in zip(names, paths):
            assert archive.read(name) == path.read_bytes()
    # Without a sample list every PNG goes in, the stray one too.
    with zipfile.ZipFile(export.make_submission_zip(out, tmp_path / "all.zip")) as archive:
        assert len(archive.namelist()) == len(samples) + 1


def test_submission_zip_refuses_a_missing_a_corrupt_or_a_duplicate_prediction(tmp_path: Path, test_split: Path):
    samples = find_samples(test_split, "test", require_labels=False)[:3]
    out = tmp_path / "preds"
    for s in samples:
        export.save_prediction(np.zeros((8, 16), np.uint8), export.prediction_path(out, s))
    missing = export.prediction_path(out, samples[1])
    missing.unlink()
    one_line_error_naming(missing, lambda: export.make_submission_zip(out, tmp_path / "a.zip", samples))
    missing.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    one_line_error_naming(missing, lambda: export.make_submission_zip(out, tmp_path / "a.zip", samples))
    export.save_prediction(np.zeros((8, 16), np.uint8), missing)
    duplicate = out / "copy" / samples[0].image.name.replace("_leftImg8bit", "_pred")
    export.save_prediction(np.zeros((8, 16), np.uint8), duplicate)
    assert "two predictions" in one_line_error_naming(duplicate, lambda: export.make_submission_zip(out, tmp_path / "a.zip"))
    assert not (tmp_path / "a.zip").exists()
    one_line_error_naming(tmp_path / "nowhere", lambda: export.make_submission_zip(tmp_path / "nowhere", tmp_path / "a.zip"))


def test_corrupt_or_missing_prediction_files_are_one_line_errors_naming_the_path(synthetic_root: Path, tmp_path: Path):
    samples = find_samples(synthetic_root, "val")[:2]
    pred_dir = tmp_path / "preds"
    good = export.save_prediction(np.zeros((128, 256), np.uint8), export.prediction_path(pred_dir, samples[0]))
    path = export.prediction_path(pred_dir, samples[1])

    assert "missing prediction" in one_line_error_naming(path, lambda: score_predictions(samples, pred_dir))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(good.read_bytes()[:60])  # truncated mid-file, as a killed writer would leave it
    assert "corrupt prediction" in one_line_error_naming(path, lambda: score_predictions(samples, pred_dir))
    path.write_bytes(b"not an image at all")
    assert "corrupt prediction" in one_line_error_naming(path, lambda: export.read_prediction(path))
    Image.fromarray(np.zeros((128, 256, 3), np.uint8)).save(path)
    assert "mode RGB" in one_line_error_naming(path, lambda: score_predictions(samples, pred_dir))
    Image.fromarray(np.zeros((64, 128), np.uint8)).save(path)
    assert "ground-truth size" in one_line_error_naming(path, lambda: score_predictions(samples, pred_dir))


def test_panels_show_image_ground_truth_and_prediction_in_the_palette(synthetic_root: Path, tmp_path: Path):
    spec = load_spec("deeplabv3-r50")
    samples = find_samples(synthetic_root, "val")
    pred_dir, panels = tmp_path / "preds", tmp_path / "panels"
    evaluate_split(tiny_model(), samples, plan_at(spec, [256, 128]), torch.device("cpu"), save_predictions_dir=pred_dir,
                   panels_dir=panels, num_panels=3, workers=0, progress=False)
    written = sorted(panels.glob("*.png"))
    assert [p.name for p in written] == sorted(f"{samples[i].stem}_panel.png" for i in (0, 4, 7))

    with Image.open(written[0]) as img:
        width, height = img.size
        panel = np.asarray(img.convert("RGB"))
    tile = (width - 2 * visualize.GAP) // 3
    assert tile == 256 and height == 128 + visualize.CAPTION_HEIGHT
    palette = {tuple(c) for c in PALETTE} | {visualize.IGNORE_COLOUR}
    for index in (1, 2):  # ground truth and prediction tiles hold palette colours only
        left = index * (tile + visualize.GAP)
        colours = {tuple(c) for c in panel[visualize.CAPTION_HEIGHT:, left : left + tile].reshape(-1, 3)}
        assert colours <= palette, colours - palette
    # The ground truth tile is the colourised ground truth, pixel for pixel.
    gt_tile = panel[visualize.CAPTION_HEIGHT:, tile + visualize.GAP : 2 * tile + visualize.GAP]
    assert (gt_tile == visualize.colorize(load_train_ids(samples[0].label).numpy())).all()

    # A smaller tile scales every tile alike.
    prediction = export.read_prediction_train_ids(export.prediction_path(pred_dir, samples[0]))
    again = visualize.save_panel(samples[0].image, prediction, load_train_ids(samples[0].label), tmp_path / "p.png",
                                 tile_width=128)
    with Image.open(again) as img:
        assert img.size == (3 * 128 + 2 * visualize.GAP, 64 + visualize.CAPTION_HEIGHT)
