from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from harness.data.augment import TrainTransform, collate_raw
from harness.data.cityscapes import IMAGENET_MEAN, IMAGENET_STD, CityscapesEval, CityscapesTrain, find_samples
from harness.data.labels import IGNORE_INDEX, LABEL_TO_TRAIN, label_ids_to_train_ids, train_ids_of
from harness.data.synthetic import write_synthetic
from harness.errors import BenchError


def test_official_label_mapping():
    assert LABEL_TO_TRAIN[7] == 0 and LABEL_TO_TRAIN[23] == 10 and LABEL_TO_TRAIN[33] == 18
    for ignored in (0, 1, 4, 6, 9, 14, 29, 30, 34):
        assert LABEL_TO_TRAIN[ignored] == IGNORE_INDEX


def test_synthetic_layout_and_train_ids(synthetic_root: Path):
    train = find_samples(synthetic_root, "train")
    val = find_samples(synthetic_root, "val")
    assert len(train) == 24 and len(val) == 8
    for sample in train[:3]:
        assert sample.image.relative_to(synthetic_root).parts[:2] == ("leftImg8bit", "train")
        assert sample.label.name == f"{sample.stem}_gtFine_labelIds.png"
    label_ids = np.concatenate([np.asarray(Image.open(s.label)).ravel() for s in train])
    train_ids = set(np.unique(label_ids_to_train_ids(label_ids))) - {IGNORE_INDEX}
    assert len(train_ids) >= 10, train_ids
    assert {0, 1, 2, 5, 7, 8, 10, 11, 13} <= train_ids  # road sidewalk building pole sign vegetation sky person car
    assert (label_ids == 1).any() or (label_ids == 4).any(), "synthetic data should contain ignored labelIds"
    # Through the dataset: the PNG's labelIds as stored, which the device maps with exactly the official mapping.
    image, label, index = CityscapesEval(val)[0]
    stored = np.array(Image.open(val[0].label))
    assert index == 0 and image.dtype == label.dtype == torch.uint8 and image.shape == (128, 256, 3)
    assert torch.equal(label, torch.from_numpy(stored)) and torch.equal(image, torch.from_numpy(np.array(Image.open(val[0].image))))
    assert torch.equal(train_ids_of(label), torch.from_numpy(LABEL_TO_TRAIN[stored]))


def test_synthetic_is_deterministic(tmp_path: Path):
    a = write_synthetic(tmp_path / "a", seed=3, train_images=2, val_images=1, progress=False)
    b = write_synthetic(tmp_path / "b", seed=3, train_images=2, val_images=1, progress=False)
    c = write_synthetic(tmp_path / "c", seed=4, train_images=2, val_images=1, progress=False)
    files = sorted(p.relative_to(a) for p in a.rglob("*.png"))
    assert len(files) == 6
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert any((a / f).read_bytes() != (c / f).read_bytes() for f in files)


def test_training_samples_are_decoded_frames_with_their_draw_and_become_crops(synthetic_root: Path):
    dataset = CityscapesTrain(find_samples(synthetic_root, "train"), [96, 64], [0.5, 2.0])
    items = [dataset[(i, 1000 + i)] for i in range(4)]
    for image, label, draw in items:
        assert image.dtype == label.dtype == torch.uint8 and image.shape == (128, 256, 3) and label.shape == (128, 256)
        assert draw.dtype == torch.int64 and draw.shape == (5,)
    images, labels = TrainTransform((96, 64), 0, IMAGENET_MEAN, IMAGENET_STD)(collate_raw(items), torch.device("cpu"))
    assert images.shape == (4, 3, 64, 96) and images.dtype == torch.float32 and labels.shape == (4, 64, 96)
    assert labels.dtype == torch.int64 and set(labels.unique().tolist()) <= set(range(19)) | {IGNORE_INDEX}


def test_missing_root_is_one_clear_line(tmp_path: Path):
    with pytest.raises(BenchError, match="does not exist") as err:
        find_samples(tmp_path / "nowhere", "train")
    assert "\n" not in str(err.value)


def test_malformed_root_says_what_was_expected(tmp_path: Path):
    (tmp_path / "leftImg8bit" / "train" / "x").mkdir(parents=True)
    with pytest.raises(BenchError, match=r"leftImg8bit/train/<city>/\*_leftImg8bit.png"):
        find_samples(tmp_path, "train")
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "leftImg8bit/train/x/x_0_0_leftImg8bit.png")
    with pytest.raises(BenchError, match="missing ground truth"):
        find_samples(tmp_path, "train")
