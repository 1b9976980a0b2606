"""Seeds, spread and verdicts per row (a light-seg row on its base row's runs), the
synthetic table showing what ran, and `bench check` for CI."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
from click.testing import CliRunner

from harness.cli import main
from harness.report.records import load_records, write_result_record
from harness.report.table import render
from harness.report.verdicts import (
    ABOVE,
    BELOW,
    IN_PROGRESS,
    NO_REFERENCE,
    NOT_RUN,
    REPRODUCED,
    check_report,
    judge,
    row_verdicts,
)
from tests.table_fixtures import full_budget_record, line_of

SEEDS = (72.4, 72.6, 72.8)  # three full-budget runs of sf_seg_v1 (reference 72.5; light-seg figure 72.11)


def three_runs() -> list[dict]:
    return [full_budget_record("sf_seg_v1", v, seed=i, time=f"2026-01-0{i + 1}T00:00:00Z") for i, v in enumerate(SEEDS)]


def test_three_seeds_give_n_mean_std_delta_and_verdict_and_the_lightseg_row_uses_them():
    text = render("cityscapes", records=three_runs())
    base, light = line_of(text, "sf_seg_v1"), line_of(text, "sf_seg_v1-lightseg")
    mean, std = statistics.fmean(SEEDS), statistics.stdev(SEEDS)
    assert base["reference mIoU"] == "72.5 (light-seg 72.11)"  # the cell as the table gives it
    assert (base["runs"], base["mean"], base["std"]) == ("3", f"{mean:.2f}", f"{std:.2f}")
    assert base["measured mIoU (runs)"] == "72.40 \\| 72.60 \\| 72.80"
    assert base["Δ"] == f"{mean - 72.5:+.2f}" and base["verdict"] == REPRODUCED
    # the light-seg row: the same three runs, against the light-seg figure
    assert light["reference mIoU"] == "72.11"
    assert (light["runs"], light["mean"], light["std"]) == ("3", f"{mean:.2f}", f"{std:.2f}")
    assert light["measured mIoU (runs)"] == "72.40 \\| 72.60 \\| 72.80 (runs of sf_seg_v1)"
    assert light["Δ"] == f"{mean - 72.11:+.2f}" and light["verdict"] == REPRODUCED
    assert line_of(text, "sf_seg_v1-ema")["verdict"] == NOT_RUN  # another recipe: not these runs


def test_a_tighter_tolerance_turns_the_lightseg_comparison_into_above():
    text = render("cityscapes", records=three_runs(), tolerance=0.3)
    assert line_of(text, "sf_seg_v1")["verdict"] == REPRODUCED  # +0.10
    assert line_of(text, "sf_seg_v1-lightseg")["verdict"] == ABOVE  # +0.49


def test_verdicts_use_the_tolerance_or_the_references_own_spread():
    assert judge([79.5], [79.1], 0.5) == REPRODUCED and judge([79.5], [78.9], 0.5) == BELOW
    assert judge([79.5], [80.1], 0.5) == ABOVE
    assert judge([79.5], [78.9], tolerance=1.0) == REPRODUCED
    # "74.6 | 75.0": a mean inside the reference's own runs is reproduced even with no tolerance at all
    assert judge([74.6, 75.0], [75.0], tolerance=0.0) == REPRODUCED
    assert judge([74.6, 75.0], [75.1], tolerance=0.0) == ABOVE
    assert judge([79.5], [], 0.5) == NOT_RUN


def test_a_row_the_table_does_not_list_is_measured_but_not_judged():
    from harness.config.spec import select_rows

    records = [full_budget_record("deeplabv3plus-r50", v, seed=i, time=f"2026-01-0{i + 1}T00:00:00Z")
               for i, v in enumerate((78.0, 79.0))]
    [verdict] = row_verdicts(select_rows("deeplabv3plus-r50"), records, tolerance=0.5)
    assert (verdict.n, verdict.mean, verdict.delta, verdict.verdict) == (2, 78.5, None, NO_REFERENCE)
    assert not verdict.outside
    report = check_report([verdict])
    assert "no reference" in report and "78.50" in report and "within the tolerance" not in report
    assert judge([], [78.0], 0.5) == NO_REFERENCE and judge([], [], 0.5) == NOT_RUN


def test_a_running_run_shows_in_progress_for_its_row_and_light_seg_row(isolated_outputs: Path):
    def run_folder(stamp: str, status: str) -> None:
        folder = isolated_outputs / "runs" / "cityscapes" / "deeplabv3-r50" / stamp
        folder.mkdir(parents=True)
        (folder / "run.json").write_text(json.dumps({"row": "deeplabv3-r50", "status": status}))

    run_folder("20260101-000000", "finished")
    assert line_of(render("cityscapes", records=[]), "deeplabv3-r50")["verdict"] == NOT_RUN
    run_folder("20260102-000000", "running")
    text = render("cityscapes", records=[])
    assert line_of(text, "deeplabv3-r50")["verdict"] == IN_PROGRESS
    assert line_of(text, "deeplabv3-r50-lightseg")["verdict"] == IN_PROGRESS
    assert line_of(text, "deeplabv3-r50-ema")["verdict"] == NOT_RUN
    done = render("cityscapes", records=[full_budget_record("deeplabv3-r50", 79.4)])
    assert line_of(done, "deeplabv3-r50")["verdict"] == f"{REPRODUCED} (+1 running)"


def test_synthetic_table_shows_what_ran_per_budget_without_deltas():
    records = [
        full_budget_record("df_seg_v1", 40.0, dataset="synthetic", iterations=400, batch_size=4, crop_size=[128, 128]),
        full_budget_record("df_seg_v1", 42.0, dataset="synthetic", iterations=400, batch_size=4, crop_size=[128, 128]),
        full_budget_record("df_seg_v1", 5.0, dataset="synthetic", iterations=2, batch_size=4, crop_size=[128, 128]),
    ]
    text = render("synthetic", records=records)
    lines = [l for l in text.splitlines() if l.startswith("| df_seg_v1 ")]
    assert len(lines) == 2  # runs of different budgets are never averaged together
    short, full = (dict(zip(["row", "model", "ema", "iterations", "batch", "crop", "runs", "measured", "mean", "std"],
                            [c.strip() for c in l.replace("\\|", "\x00").strip("|").split("|")])) for l in lines)
    assert (short["iterations"], short["batch"], short["crop"], short["runs"], short["mean"]) == ("2", "4", "[128, 128]", "1", "5.00")
    assert (full["iterations"], full["runs"], full["mean"]) == ("400", "2", "41.00")
    header = next(l for l in text.splitlines() if l.startswith("| row "))
    assert [c.strip() for c in header.strip("|").split("|")] == [
        "row", "model", "ema", "iterations", "batch", "crop", "runs", "measured mIoU (runs)", "mean", "std"]
    assert "71.8" not in text  # no Cityscapes reference figure beside synthetic runs


@pytest.fixture
def committed_runs() -> None:
    for record in three_runs():
        write_result_record(record)


def test_check_exits_0_inside_the_tolerance_and_1_outside_with_parseable_json(committed_runs):
    inside = CliRunner().invoke(main, ["check", "--rows", "sf_seg_v1*"])
    assert inside.exit_code == 0, inside.output
    assert "sf_seg_v1-lightseg" in inside.output and REPRODUCED in inside.output

    outside = CliRunner().invoke(main, ["check", "--rows", "sf_seg_v1*", "--tolerance", "0.3", "--json"])
    assert outside.exit_code == 1, outside.output
    report = json.loads(outside.output)
    assert report["outside"] == ["sf_seg_v1-lightseg"] and report["tolerance"] == 0.3
    rows = {r["row"]: r for r in report["rows"]}
    assert set(rows) == {"sf_seg_v1-lightseg", "sf_seg_v1", "sf_seg_v1-ema"}
    assert rows["sf_seg_v1"]["n"] == 3 and rows["sf_seg_v1"]["mean"] == pytest.approx(statistics.fmean(SEEDS))
    assert rows["sf_seg_v1-lightseg"]["runs_of"] == "sf_seg_v1" and rows["sf_seg_v1-lightseg"]["verdict"] == ABOVE
    assert rows["sf_seg_v1-ema"]["verdict"] == NOT_RUN

    # rows without results never fail the check
    assert CliRunner().invoke(main, ["check", "--rows", "unet-*", "--tolerance", "0"]).exit_code == 0
    bad = CliRunner().invoke(main, ["check", "--rows", "nosuchrow*"])
    assert bad.exit_code == 2 and "matches no row" in bad.output


def test_run_of_a_lightseg_row_says_so_and_trains_the_base_row(monkeypatch):
    started = []
    monkeypatch.setattr("harness.launch.run.train", lambda checked, seed: started.append(checked.options) or None)
    result = CliRunner().invoke(main, ["run", "--row", "sf_seg_v1-lightseg", "--synthetic"])
    assert result.exit_code == 0, result.output
    assert [o.row for o in started] == ["sf_seg_v1"]
    note = [l for l in result.output.splitlines() if "sf_seg_v1-lightseg" in l]
    assert len(note) == 1 and "training sf_seg_v1" in note[0]


@pytest.mark.parametrize("seeds", ["0,a", "1,1", ","])
def test_bad_seed_lists_are_refused_in_one_line(seeds):
    result = CliRunner().invoke(main, ["run", "--row", "df_seg_v1", "--synthetic", "--seeds", seeds])
    assert result.exit_code == 2 and result.output.startswith("error: --seeds") and len(result.output.splitlines()) == 1


@pytest.mark.slow
def test_seeds_run_one_after_another_each_with_its_own_record(synthetic_root: Path, one_thread):
    result = CliRunner().invoke(main, ["run", "--row", "df_seg_v1", "--synthetic", "--iters", "1", "--seeds", "2,0"])
    assert result.exit_code == 0, result.output
    records = sorted(load_records(dataset="synthetic"), key=lambda r: r.time + str(r.path))
    assert sorted(r.seed for r in records) == [0, 2]
    assert len({r.tracking_run_id for r in records}) == 2 and len({r.path for r in records}) == 2
    assert [l.split(" seed ")[1].split()[0] for l in result.output.splitlines() if " seed " in l] == ["2", "0"]
