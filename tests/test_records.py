"""Typed result records: the one writer and reader of each kind, records written by earlier code (kept in
tests/data/records/, written by `bench speed` / `bench run` / `bench eval` before records had a schema) still read,
and a record that is valid JSON with a field of the wrong type refused in one line naming the file and the field."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from harness.cli import main
from harness.errors import BenchError
from harness.report.records import (
    SCHEMA_VERSION,
    SpeedRecord,
    load_records,
    load_speed_records,
    read_record,
    read_speed_record,
    record_order,
    speed_dir,
    write_record,
    write_speed_record,
)

DATA = Path(__file__).parent / "data" / "records"
OLD_SPEED = DATA / "speed" / "schema0-cpu-sf_seg_v2.json"  # `bench speed --row sf_seg_v2 --mode infer --size 128,64
# --device cpu` at commit a3073b2, before the schema: the device's name in "dataset" and "device" both


def test_a_speed_record_of_schema_0_reads_with_its_device_and_figures():
    record = read_speed_record(OLD_SPEED)
    assert record.schema == 0 and record.row == "sf_seg_v2" and record.device == "cpu-amd-epyc"
    assert record.device_type == "cpu" and record.precision == "fp32" and record.compile is False
    infer = record.modes["infer"]
    assert infer["size"] == [128, 64] and infer["batch"] == 1
    assert infer["images_per_s"] == pytest.approx(0.24333203650416654)  # the file's figure, written out here
    assert record.time == "2026-12-06T16:17:41Z" and record.path == str(OLD_SPEED)


def test_a_speed_record_written_now_names_its_device_once_and_its_schema_and_reads_back_equal(isolated_outputs):
    old = read_speed_record(OLD_SPEED)
    written = write_speed_record(dataclasses.replace(old, schema=SCHEMA_VERSION, path=None))
    assert written.path is not None
    path = Path(written.path)
    assert path.parent == speed_dir() / "cpu-amd-epyc" / "sf_seg_v2"
    data = json.loads(path.read_text())
    assert data["schema"] == SCHEMA_VERSION and data["device"] == "cpu-amd-epyc" and "dataset" not in data
    assert data["kind"] == "speed"
    assert load_speed_records() == [written] and load_speed_records("cpu-amd-epyc") == [written]
    assert load_speed_records("nvidia-h100") == []


def test_an_old_speed_record_among_new_ones_feeds_plan_and_table(isolated_outputs):
    folder = speed_dir() / "cpu-amd-epyc" / "sf_seg_v2"
    folder.mkdir(parents=True)
    shutil.copy(OLD_SPEED, folder / OLD_SPEED.name)
    result = CliRunner().invoke(main, ["plan", "--rows", "sf_seg_v2", "--device", "cpu-amd-epyc"])
    assert result.exit_code == 0, result.output
    assert "measured on cpu-amd-epyc" in result.output


@pytest.mark.parametrize(("field", "value", "named"), [
    ("device", 7, "'device'"),
    ("matmul_peak_tflops", "fast", "'matmul_peak_tflops'"),
    ("compile", "no", "'compile'"),
    ("modes", [], "'modes'"),
    ("cpu_threads", True, "'cpu_threads'"),
])
def test_a_speed_record_with_a_field_of_the_wrong_type_is_refused_in_one_line(isolated_outputs, field, value,
                                                                               named):
    data = json.loads(OLD_SPEED.read_text())
    data[field] = value
    path = speed_dir() / "cpu-amd-epyc" / "sf_seg_v2" / "bad.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(data))
    with pytest.raises(BenchError) as refused:
        read_speed_record(path)
    message = str(refused.value)
    assert str(path) in message and named in message and "\n" not in message
    result = CliRunner().invoke(main, ["plan", "--rows", "sf_seg_v2"])
    assert result.exit_code == 2, result.output
    (line,) = result.output.strip().splitlines()
    assert line.startswith("error: ") and str(path) in line and named in line


@pytest.mark.parametrize(("change", "named"), [
    (lambda d: d["modes"]["infer"].update(images_per_s="0.24"), "modes.infer: field 'images_per_s'"),
    (lambda d: d["modes"]["infer"].update(size=[128]), "'modes.infer.size'"),
    (lambda d: d["modes"]["infer"].pop("batch"), "modes.infer: field 'batch' is missing"),
    (lambda d: d.pop("time"), "field 'time' is missing"),
])
def test_a_speed_record_with_a_bad_mode_entry_or_a_missing_field_is_refused(tmp_path, change, named):
    data = json.loads(OLD_SPEED.read_text())
    change(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(BenchError) as refused:
        read_speed_record(path)
    assert named in str(refused.value) and str(path) in str(refused.value)


def test_the_speed_record_type_has_no_dataset_field():
    assert "dataset" not in {f.name for f in dataclasses.fields(SpeedRecord)}


OLD_TRAIN = DATA / "synthetic" / "schema0-train-df_seg_v1.json"  # `bench run --row df_seg_v1 --synthetic --iters 1`
OLD_EVAL = DATA / "synthetic" / "schema0-eval-df_seg_v1.json"  # `bench eval` of that run's best.pt, both at a3073b2


def test_training_and_evaluation_records_of_schema_0_read_with_their_tracked_run_as_tracking_run_id():
    train, evaluation = read_record(OLD_TRAIN), read_record(OLD_EVAL)
    assert train["schema"] == evaluation["schema"] == 0
    assert train["tracking_run_id"] == "86c13f23536949c4bb5aeda3e0385607" and "mlflow_run_id" not in train
    assert evaluation["tracking_run_id"] == "e641824f71cb4d7d9005f606675fa302"
    assert train["kind"] == "train" and evaluation["kind"] == "eval" and train["miou"] == evaluation["miou"]
    assert sorted([evaluation, train], key=record_order) == [train, evaluation]  # 16:20:37 before 16:22:08


def test_old_training_and_evaluation_records_feed_the_table_and_the_card(isolated_outputs):
    from harness.config.spec import load_spec
    from harness.report.card import reproduction_card
    from harness.report.table import render

    folder = isolated_outputs / "results" / "synthetic" / "df_seg_v1"
    folder.mkdir(parents=True)
    for path in (OLD_TRAIN, OLD_EVAL):
        shutil.copy(path, folder / path.name)
    assert [r["tracking_run_id"] for r in load_records(dataset="synthetic")] == [
        "e641824f71cb4d7d9005f606675fa302", "86c13f23536949c4bb5aeda3e0385607"]  # file names' order
    text = render("synthetic")
    assert "| df_seg_v1 " in text and "0.03" in text
    card = reproduction_card(load_spec("df_seg_v1"), read_record(OLD_TRAIN), figures="", figure_names=())
    assert "tracking run `86c13f23536949c4bb5aeda3e0385607`" in card


def test_a_record_written_now_names_its_schema_and_tracking_run_id(isolated_outputs):
    data = json.loads(OLD_TRAIN.read_text())
    data.pop("mlflow_run_id")
    path = write_record({**data, "schema": SCHEMA_VERSION, "tracking_run_id": "0123456789abcdef"})
    assert path.name.endswith("-01234567.json")
    again = read_record(path)
    assert again["schema"] == SCHEMA_VERSION and again["tracking_run_id"] == "0123456789abcdef"
    assert "mlflow_run_id" not in json.loads(path.read_text())
