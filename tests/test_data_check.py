"""`bench data check`: every defect of a damaged Cityscapes tree is reported with its file and a non-zero
exit; a clean tree passes."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from click.testing import CliRunner
from PIL import Image

from harness.cli import main
from harness.config.benchmark import OFFICIAL_CITIES


def check(root: Path, *extra: str):
    return CliRunner().invoke(main, ["data", "check", "--data-root", str(root), "--workers", "2", *extra])


def labels(root: Path, split: str) -> list[Path]:
    return sorted((root / "gtFine" / split).glob("*/*_gtFine_labelIds.png"))


def images(root: Path, split: str) -> list[Path]:
    return sorted((root / "leftImg8bit" / split).glob("*/*_leftImg8bit.png"))


def test_clean_synthetic_tree_passes_as_a_subset(synthetic_root):
    result = check(synthetic_root, "--subset")
    assert result.exit_code == 0, result.output
    assert "no defects" in result.output
    table = {line.split()[0]: line.split() for line in result.output.splitlines()[1:] if line.split()[:1] in (["train"], ["val"])}
    assert table["train"][1:3] == ["24", "24"] and table["val"][1:3] == ["8", "8"]


def test_official_counts_and_frame_size_are_checked_with_identical_findings_grouped(synthetic_root, tmp_path):
    root = tmp_path / "cityscapes"
    shutil.copytree(synthetic_root, root)
    (root / "synthetic.json").unlink()  # no longer the generated dataset: Cityscapes' own rule applies
    (root / ".complete").unlink()
    result = check(root)
    assert result.exit_code == 1
    assert "24 images, the official train split has 2975" in result.output
    assert "8 images, the official val split has 500" in result.output
    sizes = [line for line in result.output.splitlines() if "256x128, Cityscapes frames are 2048x1024" in line]
    # one line per split, with the count and examples, instead of one per image
    assert [line.split(":")[0] for line in sizes] == ["train", "val"], result.output
    assert "image size: 24 files (" in sizes[0] and ", ...)" in sizes[0] and "image size: 8 files (" in sizes[1]
    missing_cities = [line for line in result.output.splitlines() if ": missing city: " in line]
    assert len(missing_cities) == len(OFFICIAL_CITIES["train"]) + len(OFFICIAL_CITIES["val"]), result.output
    # the missing test split, 2 counts, the official cities, 24 + 8 sizes: each still counted
    assert f"{35 + len(missing_cities)} defect(s)" in result.output


def test_the_synthetic_dataset_passes_by_its_own_rule_with_grouped_notes(synthetic_root):
    result = check(synthetic_root)
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0].startswith(f"synthetic dataset {synthetic_root} (checked against the "
                                                    "synthetic dataset: its generated counts and frame size")
    notes = [line for line in result.output.splitlines() if line.startswith("note: ")]
    assert any("train: image size: 24 files (" in n and "256x128 (synthetic; Cityscapes frames are 2048x1024)" in n
               for n in notes), result.output
    assert any("train: count" in n and "24 images (synthetic; the official train split has 2975)" in n
               for n in notes), result.output
    assert len(notes) <= 6 and "no defects" in result.output


def test_full_mode_decodes_the_pixels_that_the_header_mode_does_not(synthetic_root, tmp_path):
    root = tmp_path / "synthetic"
    shutil.copytree(synthetic_root, root)
    cut = images(root, "train")[3]
    cut.write_bytes(cut.read_bytes()[:3000])  # the header is intact: only decoding finds the damage
    quick = check(root)
    assert quick.exit_code == 0, quick.output
    assert "images read from their headers only, pixels not decoded (--full decodes them)" in quick.output
    full = check(root, "--full")
    assert full.exit_code == 1, full.output
    assert "every image and label decoded" in full.output
    defects = [line for line in full.output.splitlines() if line.startswith("train: ")]
    assert len(defects) == 1 and f"unreadable: {cut}: " in defects[0] and "truncated" in defects[0], full.output
    assert "1 defect(s)" in full.output


def test_damaged_tree_reports_each_defect_and_exits_non_zero(synthetic_root, tmp_path):
    root = tmp_path / "cityscapes"
    shutil.copytree(synthetic_root, root)
    train_labels, val_labels, train_images = labels(root, "train"), labels(root, "val"), images(root, "train")
    damage = {}
    train_labels[0].unlink()
    damage["missing label"] = train_labels[0].name
    Image.open(train_labels[1]).resize((128, 64), Image.NEAREST).save(train_labels[1])
    damage["label size"] = train_labels[1].name
    Image.open(train_labels[2]).convert("RGB").save(train_labels[2])
    damage["label mode"] = train_labels[2].name
    ids = np.array(Image.open(train_labels[3]))
    ids[:8, :8] = 200  # beyond the official ids; the rest of the label stays valid
    Image.fromarray(ids).save(train_labels[3])
    damage["label values"] = train_labels[3].name
    Image.fromarray(np.zeros((128, 256), dtype=np.uint8)).save(train_labels[4])  # labelId 0: unlabeled
    damage["no valid pixel"] = train_labels[4].name
    train_images[5].write_bytes(train_images[5].read_bytes()[:40])  # truncated
    damage["unreadable"] = train_images[5].name
    orphan = train_labels[6].with_name("synthtown_999999_000000_gtFine_labelIds.png")
    shutil.copy(train_labels[6], orphan)
    damage["orphan label"] = orphan.name

    result = check(root, "--subset")
    assert result.exit_code == 1, result.output
    defects = [line for line in result.output.splitlines() if line.startswith(("train:", "val:", "test:"))]
    for kind, name in damage.items():
        assert any(f": {kind}: " in line and name in line for line in defects), (kind, result.output)
    assert len(defects) == len(damage), result.output
    assert f"{len(damage)} defect(s)" in result.output
    # The val split was left alone: no defect is blamed on it.
    assert not any(line.startswith("val:") for line in defects) and len(val_labels) == 8


def test_a_split_without_any_valid_pixel_is_a_defect(synthetic_root, tmp_path):
    root = tmp_path / "cityscapes"
    shutil.copytree(synthetic_root, root)
    for label in labels(root, "val"):
        Image.fromarray(np.full((128, 256), 255, dtype=np.uint8)).save(label)  # 255 maps to ignore, beyond 0-33
    result = check(root, "--subset")
    assert result.exit_code == 1
    assert "no label of the split holds a valid pixel" in result.output


def test_data_root_that_is_a_file_is_one_line(tmp_path):
    file = tmp_path / "x.zip"
    file.write_bytes(b"zip")
    result = CliRunner().invoke(main, ["data", "check", "--data-root", str(file)])
    assert result.exit_code == 2 and result.stderr.strip().count("\n") == 0
    assert "is a file, not a folder" in result.stderr
