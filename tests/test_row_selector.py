"""One row selector (harness.config.spec.select_rows) behind every verb that takes rows: the same pattern list gives
the same rows through plan, check, weights, table, sweep, speed, run --row and doctor --row; verbs that train get
a light-seg row as its base row, once. The expected rows are written out from experiments/_table.yaml's order."""

from __future__ import annotations

import json
import re

import pytest
import yaml
from click.testing import CliRunner

from harness.cli import main
from harness.commands.plan import plan_costs
from harness.config.benchmark import REFERENCE_DATASET
from harness.config.spec import select_row, select_rows, training_row
from harness.errors import BenchError
from harness.launch.speed import select_rows as speed_rows
from harness.launch.sweep import select_specs
from harness.paths import experiments_dir
from harness.report.readiness import DoctorOptions
from harness.report.table import render
from harness.report.verdicts import check_rows
from harness.report.weight_files import files_by_row
from tests.helpers import experiments_with

PATTERNS = "sf_seg_v2*,pspnet-r50,deeplabv3plus-r50"
# _table.yaml lists sf_seg_v2's light-seg figure before its own rows; deeplabv3plus-r50 is one of our rows (after
# the table's).
NAMED = ["sf_seg_v2-lightseg", "sf_seg_v2", "sf_seg_v2-ema", "pspnet-r50", "deeplabv3plus-r50"]
TRAINED = ["sf_seg_v2", "sf_seg_v2-ema", "pspnet-r50", "deeplabv3plus-r50"]


def test_every_verb_that_takes_rows_gets_the_same_rows():
    assert [s.row for s in select_rows(PATTERNS)] == NAMED
    assert [s.row for s in select_rows(PATTERNS, training=True)] == TRAINED
    # Verbs that read rows: each named row, light-seg rows included.
    assert [c.row for c in plan_costs(PATTERNS, gpus=8, seeds=1, device="cpu")[1]] == NAMED
    assert [v.row for v in check_rows(PATTERNS)] == NAMED
    files, none, _ = files_by_row(PATTERNS)
    assert {spec.row for specs in files.values() for spec in specs} | set(none) == set(NAMED)
    checked = CliRunner().invoke(main, ["check", "--rows", PATTERNS, "--json"])
    assert [r["row"] for r in json.loads(checked.output)["rows"]] == NAMED
    # Verbs that train (or time training): a light-seg row is its base row's recipe and network, once.
    assert [s.row for s in select_specs(PATTERNS)] == TRAINED
    assert [s.row for s in speed_rows(PATTERNS)] == TRAINED
    dry = CliRunner().invoke(main, ["sweep", "--rows", PATTERNS, "--synthetic", "--executor", "local", "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert [line.split()[0] for line in dry.output.splitlines()[2:2 + len(TRAINED)]] == TRAINED
    # Single-row verbs (run --row, doctor --row): each named row, trained as the same row.
    assert [training_row(row)[0] for row in NAMED] == ["sf_seg_v2", *TRAINED]
    assert [select_row(row, training=True).row for row in NAMED] == ["sf_seg_v2", *TRAINED]


def test_all_is_every_row_and_sweep_lists_each_training_row_once():
    table = yaml.safe_load((experiments_dir() / "_table.yaml").read_text())["rows"]
    every = [s.row for s in select_rows("all")]
    assert every[:len(table)] == table and set(every[len(table):]) == {"deeplabv3plus-r50", "fpn-mobilenet"}
    trained = [row for row in every if not row.endswith("-lightseg")]
    dry = CliRunner().invoke(main, ["sweep", "--rows", "all", "--synthetic", "--executor", "local", "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert [line.split()[0] for line in dry.output.splitlines()[2:2 + len(trained)]] == trained
    assert [s.row for s in speed_rows("all")] == trained
    assert [c.row for c in plan_costs("all", gpus=8, seeds=1, device="cpu")[1]] == every
    # benchmark.md (no --rows: every row; ours join it once they have records) lists the table's rows in that order.
    markdown = render(REFERENCE_DATASET, records=[], figure=None)
    assert [line.split("|")[1].strip() for line in markdown.splitlines()
            if line.startswith("| ") and not line.startswith("| row ")] == table


@pytest.mark.parametrize("patterns, message", [("nope*", "--rows 'nope*' matches no row"),
                                               (" , ", "names no row")])
def test_a_pattern_naming_nothing_is_one_line_for_every_verb(patterns, message):
    for verb in (select_rows, select_specs, speed_rows, check_rows, files_by_row):
        with pytest.raises(BenchError, match=re.escape(message)):
            verb(patterns)


def test_a_single_row_verb_refuses_a_glob_of_several_rows_and_names_the_closest_id():
    assert select_row("pspnet-r5?").row == "pspnet-r50"
    with pytest.raises(BenchError, match="names 3 rows"):
        select_row("sf_seg_v2*")
    with pytest.raises(BenchError, match="closest: pspnet-r50"):
        select_row("pspnet-r5")
    doctor = CliRunner().invoke(main, ["doctor", "--row", "sf_seg_v2*", "--synthetic"])
    assert doctor.exit_code == 2 and "names 2 rows" in doctor.stderr and len(doctor.stderr.splitlines()) == 1


def test_doctor_checks_a_light_seg_row_as_the_row_it_trains():
    from harness.commands.doctor import doctor

    checks = doctor(DoctorOptions(row="sf_seg_v2-lightseg", synthetic=True)).checks
    assert checks  # ran, as sf_seg_v2 (a light-seg row has no recipe of its own to check)


@pytest.mark.slow
def test_a_new_row_sweeps_through_the_local_executor(tmp_path, monkeypatch, synthetic_root):
    root = experiments_with(tmp_path, {})
    monkeypatch.setenv("SEGBENCH_EXPERIMENTS", str(root))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    made = CliRunner().invoke(main, ["new-row", "fpn-r18", "--arch", "FPN", "--encoder", "resnet18"])
    assert made.exit_code == 0, made.output
    swept = CliRunner().invoke(main, ["sweep", "--rows", "fpn-r18", "--executor", "local", "--synthetic",
                                      "--iters", "1", "--wait"])
    assert swept.exit_code == 0, swept.output
    from harness.report.records import load_records

    (record,) = load_records(dataset="synthetic")
    assert record.row == "fpn-r18" and record.iterations == 1
