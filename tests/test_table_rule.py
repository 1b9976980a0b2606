"""The counting rule: only real reproductions reach benchmark.md's measured columns; every other record is kept
and listed under its own heading. The rule is harness.report.verdicts.standing; the table applies it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from harness.launch.run import RunOptions, run
from harness.config.plan import make_plan
from harness.config.spec import load_all, load_spec
from harness.report.records import load_records
from harness.report.table import RANDOM_START_MARK, render
from harness.report.verdicts import (
    OFFICIAL_TRAIN_IMAGES,
    OTHER_DATA,
    OTHER_WEIGHTS,
    PARTIAL,
    RANDOM_START,
    REPRODUCTION,
    SMOKE,
    planned_iterations,
    standing,
)
from tests.table_fixtures import full_budget_record, line_of


def test_planned_budget_is_the_runners_plan_on_the_official_train_split():
    """The rule's budget is what `bench run` plans for Cityscapes, for every row (no second formula drifting away)."""
    for spec in load_all():
        plan = make_plan(spec, "cityscapes", OFFICIAL_TRAIN_IMAGES)
        assert planned_iterations(spec) == plan.iters, spec.row
    assert planned_iterations(load_spec("df_seg_v1")) == 180 * 186  # 180 epochs of ceil(2975 / 16)


@pytest.mark.parametrize("change, kind", [
    ({}, REPRODUCTION),
    ({"iterations": 2}, SMOKE),  # `--iters 1`-style runs
    ({"iterations": 180 * 186 // 2}, PARTIAL),  # half the budget
    ({"iterations": 180 * 186 + 1}, PARTIAL),  # not the planned budget either
    ({"val_images": 8, "train_images": 24}, OTHER_DATA),  # a folder that is not the official split
    ({"val_images": 499}, OTHER_DATA),
    ({"val_images": None, "train_images": None}, OTHER_DATA),  # a record that cannot say
    ({"dataset": "synthetic"}, OTHER_DATA),
    ({"starting_weights": "missing /w/df1_imagenet.pth"}, RANDOM_START),
    ({"starting_weights": "other /w/resnet50-ebb6acbb.pth (checksum mismatch (SHA-1 0123456789ab, the published is "
                          "ebb6acbbd1d1))"}, OTHER_WEIGHTS),
])
def test_each_kind_of_record_lands_where_the_rule_says(change, kind):
    spec = load_spec("df_seg_v1")
    record = full_budget_record("df_seg_v1", 71.5, **change)
    result = standing(spec, record)
    assert result.kind == kind
    assert result.counts == (kind == REPRODUCTION)
    assert (result.reason == "") == (kind == REPRODUCTION)


def test_only_reproductions_reach_the_measured_columns():
    records = [
        full_budget_record("df_seg_v1", 71.50, time="2026-01-01T00:00:00Z"),
        # a Cityscapes-layout synthetic folder, --iters 1, random start
        full_budget_record("df_seg_v1", 0.01, iterations=1, val_images=8, train_images=24,
                           starting_weights="missing weights/df1_imagenet.pth", time="2026-01-02T00:00:00Z"),
        full_budget_record("df_seg_v1", 33.33, iterations=2 * 186, time="2026-01-03T00:00:00Z"),
        full_budget_record("df_seg_v1", 44.44, iterations=50, time="2026-01-04T00:00:00Z"),
        full_budget_record("df_seg_v1", 55.55, starting_weights="missing weights/df1_imagenet.pth",
                           time="2026-01-05T00:00:00Z"),
    ]
    text = render("cityscapes", records=records)
    main = text.split("## Runs that do not count")[0]
    line = line_of(main, "df_seg_v1")
    assert line["runs"] == "1" and line["measured mIoU (runs)"] == "71.50" and line["mean"] == "71.50"
    for value in ("0.01", "33.33", "44.44", "55.55"):
        assert value not in main
    others = text.split("## Runs that do not count")[1]
    sections = {part.split("\n", 1)[0].strip(): part for part in others.split("\n### ")[1:]}
    assert set(sections) == {OTHER_DATA, SMOKE, PARTIAL, RANDOM_START}
    assert "0.01" in sections[OTHER_DATA] and "24 / 8" in sections[OTHER_DATA]
    assert "44.44" in sections[SMOKE] and "50 of 33480" in sections[SMOKE]
    assert "33.33" in sections[PARTIAL] and "372 of 33480" in sections[PARTIAL]
    assert f"55.55{RANDOM_START_MARK}" in sections[RANDOM_START]


def test_all_lists_every_record_with_its_kind():
    records = [full_budget_record("df_seg_v1", 71.5), full_budget_record("df_seg_v1", 3.0, iterations=3)]
    text = render("cityscapes", records=records, all_records=True)
    listing = text.split("## Every record")[1]
    kinds = [line.split("|")[1].strip() for line in listing.splitlines() if line.startswith("| ") and "kind" not in line]
    assert kinds == [REPRODUCTION, SMOKE]


@pytest.mark.slow
def test_a_run_records_its_split_sizes_and_crop(synthetic_root: Path, one_thread):
    """`bench run` writes what the rule and the synthetic table read: train/val image counts and the crop it trained.
    (A synthetic run: the Cityscapes recipe on a synthetic folder trains 1024-pixel crops, minutes on CPU.)"""
    run(RunOptions(row="df_seg_v1", synthetic=True, iters=1, progress=False))
    (stored,) = load_records(dataset="synthetic")
    assert stored.train_images == len(list((synthetic_root / "leftImg8bit" / "train").rglob("*.png")))
    assert stored.val_images == len(list((synthetic_root / "leftImg8bit" / "val").rglob("*.png")))
    assert stored.crop_size == load_spec("df_seg_v1").synthetic.crop_size
    assert standing(load_spec("df_seg_v1"), stored).kind == OTHER_DATA
    # The same record with the dataset name of a --data-root run is still not the official split.
    assert standing(load_spec("df_seg_v1"), dataclasses.replace(stored, dataset="cityscapes")).kind == OTHER_DATA
