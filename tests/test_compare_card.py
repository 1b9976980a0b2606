"""After the run: the reproduction card every finished run gets (run folder and MLflow), `bench report` for older runs,
and `bench compare` of runs, records, MLflow runs and rows. One finished synthetic run serves every test."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from harness.cli import main
from harness.config.spec import load_spec
from harness.data.cityscapes import CLASS_NAMES
from harness.engine.run_folder import RunFolder
from harness.report.card import reproduction_card
from harness.report.records import read_record
from tests.conftest import REFERENCE

SECTIONS = ("## Row and verdict", "## Counting rule", "## Weights", "## Recipe: this run beside United-Perception's "
            "config", "## Environment", "## Time", "## Curves", "## Per-class IoU (%)")


def invoke(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def use(run, monkeypatch) -> None:
    for key, value in run.env.items():
        monkeypatch.setenv(key, value)


def table_rows(card: str, heading: str) -> dict[str, list[str]]:
    """First cell -> the other cells of each row of the markdown table under `heading`."""
    section = card.split(heading, 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if line.startswith("|") and not line.startswith("| ---"):
            rows[cells[0]] = cells[1:]
    return rows


def test_finished_run_has_a_card_with_every_section_in_its_folder_and_in_mlflow(finished_run):
    card = (finished_run.folder / "report.md").read_text()
    for heading in SECTIONS:
        assert heading in card, heading
    record = finished_run.record
    assert RunFolder.open(finished_run.folder).info["record"] == record.path
    # A synthetic run has no reference, Δ or verdict (the table measured Cityscapes): the headline alone; the
    # counting rule says why it does not count.
    verdict = card.split("## Row and verdict", 1)[1].split("## ", 1)[0]
    assert f"{record.miou_ema_best:.2f} mIoU (best evaluation of the EMA weights" in verdict
    assert "no reference, no Δ and no verdict" in verdict and "72.96" not in card and "below" not in verdict
    assert "**Does not count** (other data): dataset 'synthetic', not Cityscapes" in card
    # Starting weights with their checksum (the row's ImageNet file is absent here: said so).
    weights = table_rows(card, "## Weights")
    assert any("df1_imagenet.pth" in key and cells[-1] == "not there" for key, cells in weights.items())
    # The recipe beside UP's config, field by field, where the reference configs are beside this checkout.
    recipe = table_rows(card, "## Recipe")
    if (REFERENCE / "united-perception").is_dir():
        assert "configs/seg/SF_seg/SF_seg_v1_ema.yaml" in card
        assert recipe["iters"] == ["2", "360", "synthetic budget (CPU-sized)"]
        assert recipe["momentum"] == ["0.9", "0.9", "="] and recipe["ohem_thresh"] == ["0.7", "0.7", "="]
    else:  # a user's clone: the plan alone
        assert "UP config not available" in card and recipe["momentum"] == ["0.9", "", ""]
    # Environment, time, figures (whose links resolve from the run folder) and all 19 classes with both weight sets.
    environment = table_rows(card, "## Environment")
    assert environment["torch"] == [record.versions["torch"]] and environment["GPU"] == ["none (CPU run)"]
    assert environment["commit"][0] == record.git_commit.removesuffix("-dirty")
    assert table_rows(card, "## Time")["GPU-hours"] == ["0 (a CPU run)"]
    for link in re.findall(r"!\[[^]]*\]\(([^)]+)\)", card):
        assert (finished_run.folder / link).is_file(), link
    per_class = table_rows(card, "## Per-class IoU (%)")
    assert all(len(per_class[name]) == 2 for name in CLASS_NAMES)

    client = MlflowClient(finished_run.tracking_uri)
    assert "report.md" in {a.path for a in client.list_artifacts(record.tracking_run_id)}
    logged = Path(client.download_artifacts(record.tracking_run_id, "report.md", str(finished_run.root / "dl")))
    assert "![training curves](plots/training_curves.png)" in logged.read_text()
    assert read_record(Path(str(record.path))).weight_files[0]["sha256"] is None


def test_card_says_when_ups_config_is_not_beside_the_checkout(finished_run, tmp_path, monkeypatch):
    monkeypatch.setenv("SEGBENCH_REFERENCE", str(tmp_path / "nothing"))
    card = reproduction_card(load_spec("sf_seg_v1-ema"), read_record(Path(str(finished_run.record.path))))
    assert "UP config not available" in card and "| iters | 2 | - |" not in card
    assert table_rows(card, "## Recipe")["iters"] == ["2", "", ""]


def test_bench_report_writes_the_card_of_an_older_run_and_logs_it(finished_run, tmp_path, monkeypatch):
    use(finished_run, monkeypatch)
    old = tmp_path / "old-run"
    shutil.copytree(finished_run.folder, old)
    (old / "report.md").unlink()
    result = invoke("report", str(old))
    assert result.exit_code == 0, result.output
    assert (old / "report.md").is_file() and "## Counting rule" in (old / "report.md").read_text()
    assert "logged to the run" in result.output
    failed = tmp_path / "failed-run"
    shutil.copytree(finished_run.folder, failed)
    RunFolder.open(failed).end("FAILED")
    result = CliRunner().invoke(main, ["report", str(failed)])
    assert result.exit_code == 2 and "is failed, not finished" in result.output


@pytest.fixture
def changed_record(finished_run, tmp_path) -> Path:
    """A second synthetic run's record: run A's, with another learning rate, another torch and a worse road."""
    record = json.loads(Path(str(finished_run.record.path)).read_text())
    record["plan"]["lr"] = 0.02
    record["versions"]["torch"] = "2.4.0"
    record["per_class_iou_ema"]["road"] = record["per_class_iou_ema"]["road"] + 7.5
    path = tmp_path / "run-b.json"
    path.write_text(json.dumps(record))
    return path


def test_compare_two_runs_side_by_side_with_the_differing_recipe_and_versions(finished_run, changed_record, tmp_path):
    figure = tmp_path / "heatmap.png"
    result = invoke("compare", str(finished_run.folder), str(changed_record), "--figure", str(figure),
                    "--tracking-uri", finished_run.tracking_uri)
    assert result.exit_code == 0, result.output
    text = result.output
    ema = finished_run.record.per_class_iou_ema
    lines = {line.split("  ")[0]: line for line in text.splitlines()}
    for name in CLASS_NAMES:  # every class, both IoUs and the gap
        assert name in lines, name
    road = lines["road"].split()
    assert road[1:] == [f"{ema['road']:.2f}", f"{ema['road'] + 7.5:.2f}", "+7.50"]
    first_class = text.split("largest gap first:")[1].splitlines()[3].split()[0]
    assert first_class == "road"  # the largest gap first
    recipe = text.split("recipe fields that differ")[1].split("versions")[0]
    assert re.search(r"\blr\s+0\.01\s+0\.02", recipe) and "(1 of" in text
    versions = text.split("versions and environment that differ")[1]
    assert re.search(rf"\btorch\s+{re.escape(finished_run.record.versions['torch'])}\s+2\.4\.0", versions)
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = tmp_path / "again.png"
    invoke("compare", str(finished_run.folder), str(changed_record), "--figure", str(again))
    assert again.read_bytes() == figure.read_bytes()  # deterministic

    parsed = json.loads(invoke("compare", str(finished_run.folder), str(changed_record), "--json").output)
    assert parsed["recipe_differences"] == {"lr": ["0.01", "0.02"]}
    assert parsed["version_differences"]["torch"][1] == "2.4.0"
    assert parsed["classes"][0]["class"] == "road" and parsed["classes"][0]["gap"] == pytest.approx(7.5)


def test_compare_an_mlflow_run_with_its_row_and_refuse_a_bad_argument(finished_run, monkeypatch):
    use(finished_run, monkeypatch)
    run_id = finished_run.record.tracking_run_id
    parsed = json.loads(invoke("compare", run_id, "sf_seg_v1-ema", "--dataset", "synthetic", "--json").output)
    assert [r["source"].split(" (")[0] for r in parsed["runs"]] == ["MLflow run", "row"]
    assert parsed["recipe_differences"] == {} and parsed["version_differences"] == {}
    assert all(c["gap"] in (0.0, None) for c in parsed["classes"])
    for bad, said in (("no-such-thing", "'no-such-thing' is neither a run folder"),
                      ("0" * 32, "is no MLflow run in"), ("sf_seg_v1", "has no counted runs on cityscapes")):
        result = CliRunner().invoke(main, ["compare", str(finished_run.folder), bad])
        assert result.exit_code == 2 and said in result.output and len(result.output.strip().splitlines()) == 1, \
            result.output
