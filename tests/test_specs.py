"""Every row of the seed table is a spec whose columns and reference equal the table's, parsed from the file."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from harness.config.spec import load_all, load_spec, row_ids
from harness.errors import BenchError
from harness.paths import PROJECT_ROOT
from tests.conftest import SEED_TABLE, reference_file


def parse_seed_table(path: Path) -> list[dict[str, str]]:
    lines = [l for l in path.read_text().splitlines() if l.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = []
    for line in lines[2:]:
        # "80.5 \| 80.2" is one cell: split only on pipes that are not escaped.
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip()[1:-1])]
        rows.append(dict(zip(header, cells)))
    return rows


def parse_miou_cell(cell: str) -> tuple[list[float], float | None]:
    lightseg = re.search(r"\(light-seg ([\d.]+)\)", cell)
    values = re.sub(r"\(light-seg [\d.]+\)", "", cell)
    return [float(v) for v in values.split("\\|")], float(lightseg.group(1)) if lightseg else None


def test_every_row_matches_the_seed_table():
    seed = parse_seed_table(reference_file(SEED_TABLE))
    specs = load_all()
    assert len(seed) == 34 and len(specs) == 34
    for cells, spec in zip(seed, specs):
        c = spec.columns
        assert c.model == cells["model"], spec.row
        assert c.backbone == cells["backbone"], spec.row
        assert c.ema == {"yes": True, "no": False}[cells["ema"]], spec.row
        assert (c.crop_test is None) == (cells["crop test"] == "-"), spec.row
        assert c.batch_size == int(cells["bs"]), spec.row
        assert c.epochs == int(cells["epoch"]), spec.row
        assert c.test_size == [int(v) for v in cells["general test size"].strip("[]").split(",")], spec.row
        values, lightseg = parse_miou_cell(cells["mIoU"])
        assert spec.reference.miou == values, spec.row
        assert spec.reference.lightseg == lightseg, spec.row
        light_row = "light-seg" in cells["model"]
        assert spec.row.endswith("-lightseg") == light_row
        assert (spec.reference.source == "light-seg") == light_row
        assert spec.row.endswith("-ema") == c.ema


def test_row_ids_follow_the_naming_scheme():
    ids = row_ids()
    for expected in ("deeplabv3-r50", "deeplabv3-r101-ema", "df_seg_v1-mseg", "sf_seg_v2-ema", "pspnet-r50",
                     "bisenet-r18-ema", "icnet-r50-lightseg", "unet-769", "unet-1024-ema"):
        assert expected in ids
    assert len(set(ids)) == 34


def test_lightseg_row_has_its_base_rows_recipe():
    base, light = load_spec("pspnet-r50"), load_spec("pspnet-r50-lightseg")
    assert light.train == base.train and light.loss == base.loss and light.model == base.model
    assert light.reference.miou == [75.93] and base.reference.miou == [77.46]


def test_family_defaults_reach_rows():
    spec = load_spec("sf_seg_v2-ema")
    assert spec.loss.name == "ohem" and spec.train.weight_decay == 5e-4 and spec.train.crop_size == [1024, 1024]
    assert load_spec("deeplabv3-r101").loss.aux_weights == [0.4]
    assert load_spec("unet-1024").train.crop_size == [1024, 1024]


def test_reference_is_never_inherited():
    # sf_seg_v1's cell carries a light-seg note; its EMA and light-seg rows must not.
    assert load_spec("sf_seg_v1").reference.lightseg == 72.11
    assert load_spec("sf_seg_v1-ema").reference.lightseg is None
    assert load_spec("sf_seg_v1-lightseg").reference.lightseg is None


@pytest.fixture
def experiments_copy(tmp_path, monkeypatch):
    root = tmp_path / "experiments"
    shutil.copytree(PROJECT_ROOT / "experiments", root)
    monkeypatch.setenv("SEGBENCH_EXPERIMENTS", str(root))
    return root


def test_unknown_key_names_file_and_key(experiments_copy):
    path = experiments_copy / "pspnet-r50.yaml"
    path.write_text(path.read_text() + "train:\n  learning_rate: 0.1\n")
    with pytest.raises(BenchError) as err:
        load_spec("pspnet-r50")
    message = str(err.value)
    assert "pspnet-r50.yaml" in message and "train.learning_rate" in message and "\n" not in message


def test_wrong_type_names_file_and_key(experiments_copy):
    path = experiments_copy / "unet-769.yaml"
    path.write_text(path.read_text().replace("  model: UNet (769)\n", "  model: UNet (769)\n  epochs: many\n"))
    with pytest.raises(BenchError, match=r"unet-769\.yaml: columns\.epochs: expected int, got 'many'"):
        load_spec("unet-769")


def test_unknown_row_suggests_close_ids():
    with pytest.raises(BenchError, match="closest: sf_seg_v2-ema"):
        load_spec("sf_seg_v2-emma")


@pytest.mark.parametrize("key, value, accepted", [
    ("lr_per_image", -0.01, "a positive number"),
    ("crop_size", [0, 769], "two positive integers"),
    ("scale_range", [1.5, 2.0], "0 < low <= 1 <= high"),
    ("warmup_type", "cosine", "linear"),
])
def test_values_out_of_range_are_refused_in_one_line(experiments_copy, key, value, accepted):
    path = experiments_copy / "pspnet-r50.yaml"
    path.write_text(path.read_text() + f"train:\n  {key}: {value}\n")
    with pytest.raises(BenchError) as err:
        load_spec("pspnet-r50")
    message = str(err.value)
    assert f"train.{key} is {value!r}" in message and accepted in message and "\n" not in message


def test_row_key_must_name_its_own_file(experiments_copy):
    path = experiments_copy / "pspnet-r50.yaml"
    path.write_text("row: pspnet-r50-ema\n" + path.read_text())
    with pytest.raises(BenchError, match=r"key 'row' says 'pspnet-r50-ema' but the file is pspnet-r50\.yaml"):
        load_spec("pspnet-r50")
