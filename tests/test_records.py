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
from harness.paths import results_dir
from harness.report.records import (
    SCHEMA_VERSION,
    EvalRecord,
    SpeedRecord,
    TrainRecord,
    load_records,
    load_speed_records,
    read_record,
    read_speed_record,
    record_order,
    speed_dir,
    write_result_record,
    write_speed_record,
)
from tests.table_fixtures import full_budget_record

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
# Written by today's code (schema 1, at 830d514) before the records were typed: `bench run --row sf_seg_v1-ema
# --synthetic --iters 2 --seed 1` after a seed-0 run (so its early warning compared), `bench eval --synthetic` of its
# best.pt, and `bench eval --weights raw --offline-tracking` of it (no tracked run).
NEW_TRAIN = DATA / "synthetic" / "schema1-train-sf_seg_v1-ema.json"
NEW_EVAL = DATA / "synthetic" / "schema1-eval-sf_seg_v1-ema.json"
NEW_EVAL_OFFLINE = DATA / "synthetic" / "schema1-eval-offline-sf_seg_v1-ema.json"
EVERY_RECORD = (OLD_TRAIN, OLD_EVAL, NEW_TRAIN, NEW_EVAL, NEW_EVAL_OFFLINE)


def test_training_and_evaluation_records_of_schema_0_read_with_their_tracked_run_as_tracking_run_id():
    train, evaluation = read_record(OLD_TRAIN), read_record(OLD_EVAL)
    assert isinstance(train, TrainRecord) and isinstance(evaluation, EvalRecord)
    assert train.schema == evaluation.schema == 0
    assert train.tracking_run_id == "86c13f23536949c4bb5aeda3e0385607" and not hasattr(train, "mlflow_run_id")
    assert evaluation.tracking_run_id == "e641824f71cb4d7d9005f606675fa302"
    assert train.kind == "train" and evaluation.kind == "eval" and train.miou == evaluation.miou
    assert train.behind is None and train.data_digests is None  # fields schema 0 did not have
    assert train.path == str(OLD_TRAIN) and evaluation.path == str(OLD_EVAL)
    assert sorted([evaluation, train], key=record_order) == [train, evaluation]  # 16:20:37 before 16:22:08


def test_records_of_schema_1_read_with_every_figure_the_file_holds():
    train = read_record(NEW_TRAIN)
    assert isinstance(train, TrainRecord) and train.schema == 1 and train.row == "sf_seg_v1-ema" and train.seed == 1
    # the file's figures, written out here
    assert train.miou == train.miou_ema_best == 0.6248281082552497 and train.miou_weights == "ema"
    assert train.miou_final == train.miou_best == 0.7182176325940495 and train.miou_iteration == 2
    assert train.per_class_iou_ema is not None and train.per_class_iou_ema["vegetation"] == 7.390771956334835
    assert train.per_class_iou["bicycle"] is None  # undefined: null in the file
    assert train.behind is not None and train.behind["behind_miou"] == -0.6112 and train.behind["flagged"] is False
    assert train.data_digests == {"train": "deaea6e7b6501c4ef94898c67e12348a",
                                  "val": "674817292588bb98f543dbe1d80fa5b7"}
    assert (train.iterations, train.batch_size, train.crop_size) == (2, 4, [128, 128])
    assert (train.train_images, train.val_images, train.devices) == (24, 8, 1)
    assert train.tracking_run_id == "a80093cd0ef7478ba5a321c663d5fc1a" and train.plan["iters"] == 2
    evaluation, offline = read_record(NEW_EVAL), read_record(NEW_EVAL_OFFLINE)
    assert isinstance(evaluation, EvalRecord) and isinstance(offline, EvalRecord)
    assert (evaluation.weights, evaluation.split, evaluation.test_mode) == ("ema", "val", "whole")
    assert evaluation.miou == train.miou and evaluation.test_size == [256, 128]
    assert evaluation.tracking_run_id == "1ea2f4ca0edb437f9cfe27d4736a6ff5"
    assert offline.weights == "raw" and offline.tracking_run_id is None and offline.miou == train.miou_final
    assert evaluation.weight_files[0]["path"] == train.best_checkpoint


@pytest.mark.parametrize("source", EVERY_RECORD, ids=lambda p: p.stem)
def test_a_record_written_again_reads_back_equal_and_a_schema_1_file_is_written_as_it_was(isolated_outputs, source):
    record = read_record(source)
    written = write_result_record(dataclasses.replace(record, schema=SCHEMA_VERSION))
    assert written.path is not None and Path(written.path).parent == results_dir() / record.dataset / record.row
    assert read_record(Path(written.path)) == written == dataclasses.replace(record, schema=SCHEMA_VERSION)
    data, original = json.loads(Path(written.path).read_text()), json.loads(source.read_text())
    if "schema" in original:  # nothing lost, nothing added
        assert data == original
    else:
        added = {"schema": SCHEMA_VERSION, "tracking_run_id": original.pop("mlflow_run_id")}
        if record.kind == "train":
            added.update(behind=None, data_digests=None)
        assert data == {**original, **added}


def test_load_records_gives_typed_records_of_both_kinds(isolated_outputs):
    folder = isolated_outputs / "results" / "synthetic"
    for source in EVERY_RECORD:
        (folder / source.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(source, folder / source.parent.name / source.name)
    records = load_records(dataset="synthetic")
    assert [type(r).__name__ for r in records] == ["EvalRecord", "TrainRecord", "EvalRecord", "EvalRecord",
                                                   "TrainRecord"]  # the files' names' order
    assert load_records(dataset="cityscapes") == []


def test_a_fixture_record_written_reads_back_equal(isolated_outputs):
    record = full_budget_record("sf_seg_v1-ema", 73.0, tracking_run_id="0123456789abcdef")
    written = write_result_record(record)
    assert Path(str(written.path)).name == "20260101T000000Z-01234567.json"
    assert read_record(Path(str(written.path))) == record


def test_old_training_and_evaluation_records_feed_the_table_and_the_card(isolated_outputs):
    from harness.config.spec import load_spec
    from harness.report.card import reproduction_card
    from harness.report.table import render

    folder = isolated_outputs / "results" / "synthetic" / "df_seg_v1"
    folder.mkdir(parents=True)
    for path in (OLD_TRAIN, OLD_EVAL):
        shutil.copy(path, folder / path.name)
    assert [r.tracking_run_id for r in load_records(dataset="synthetic")] == [
        "e641824f71cb4d7d9005f606675fa302", "86c13f23536949c4bb5aeda3e0385607"]  # file names' order
    text = render("synthetic")
    assert "| df_seg_v1 " in text and "0.03" in text
    card = reproduction_card(load_spec("df_seg_v1"), read_record(OLD_TRAIN), figures="", figure_names=())
    assert "tracking run `86c13f23536949c4bb5aeda3e0385607`" in card


def test_a_record_written_now_names_its_kind_schema_and_tracking_run_id(isolated_outputs):
    record = dataclasses.replace(read_record(OLD_TRAIN), schema=SCHEMA_VERSION, tracking_run_id="0123456789abcdef")
    path = Path(str(write_result_record(record).path))
    assert path.name.endswith("-01234567.json")
    again = read_record(path)
    assert again.schema == SCHEMA_VERSION and again.tracking_run_id == "0123456789abcdef"
    data = json.loads(path.read_text())
    assert "mlflow_run_id" not in data and data["kind"] == "train" and data["schema"] == SCHEMA_VERSION


@pytest.mark.parametrize(("source", "field", "value", "named"), [
    (NEW_TRAIN, "seed", "1", "field 'seed' is \"1\" (str), not integer"),
    (NEW_TRAIN, "miou", None, "field 'miou' is null"),
    (NEW_TRAIN, "miou_final", True, "field 'miou_final' is true (bool), not number"),
    (NEW_TRAIN, "per_class_iou", [1, 2], "field 'per_class_iou' is [1, 2] (list), not object"),
    (NEW_TRAIN, "per_class_iou_ema", {"road": "high"}, "field 'per_class_iou_ema.road' is \"high\""),
    (NEW_TRAIN, "crop_size", [128, "128"], "field 'crop_size[1]'"),
    (NEW_TRAIN, "behind", "no", "field 'behind' is \"no\" (str), not object or null"),
    (OLD_TRAIN, "starting_weights", None, "field 'starting_weights' is null"),
    (NEW_EVAL, "weights", 1, "field 'weights' is 1 (int), not string"),
    (NEW_EVAL, "test_size", "256x128", "field 'test_size'"),
    (OLD_EVAL, "tracking_run_id", 7, "field 'tracking_run_id' is 7 (int), not string or null"),
    (NEW_EVAL, "kind", "evaluation", "field 'kind' is \"evaluation\", not one of \"train\", \"eval\""),
])
def test_a_result_record_with_a_field_of_the_wrong_type_is_refused_in_one_line(isolated_outputs, source, field,
                                                                                value, named):
    data = json.loads(source.read_text())
    data[field] = value
    path = results_dir() / "synthetic" / str(data["row"]) / "bad.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(data))
    with pytest.raises(BenchError) as refused:
        read_record(path)
    message = str(refused.value)
    assert message.startswith(f"result record {path}: ") and named in message and "\n" not in message
    assert "remove it" in message  # the fix
    result = CliRunner().invoke(main, ["table", "--all"])
    assert result.exit_code == 2, result.output
    (line,) = result.output.strip().splitlines()
    assert line.startswith("error: ") and str(path) in line and named in line


@pytest.mark.parametrize(("source", "missing"), [(NEW_TRAIN, "val_images"), (NEW_TRAIN, "behind"),
                                                 (OLD_TRAIN, "plan"), (NEW_EVAL, "split"), (NEW_EVAL, "kind")])
def test_a_result_record_missing_a_field_is_refused_naming_it(tmp_path, source, missing):
    data = json.loads(source.read_text())
    del data[missing]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(BenchError) as refused:
        read_record(path)
    message = str(refused.value)
    assert str(path) in message and f"field '{missing}' is missing" in message and "\n" not in message
