"""The README's main job, run as written (`bench run --row sf_seg_v2-ema --synthetic`, the full synthetic budget),
and every output of it read back: the closing line, the result record, run.json, the reproduction card, the MLflow
run's tags and metrics. A synthetic run is never a reproduction: none of them carries a Cityscapes reference, a Δ or
a verdict; and each raw or EMA figure stands where its name says (the card's columns, the val curves)."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from harness.cli import main
from harness.paths import PROJECT_ROOT, default_tracking_uri, runs_dir
from harness.report.records import load_records

pytestmark = pytest.mark.slow

VERDICT_WORDS = re.compile(r"\b(reproduced|below|above|within tolerance)\b", re.IGNORECASE)


def main_job() -> list[str]:
    """The `bench run` of the README's set-up block, word for word."""
    setup = (PROJECT_ROOT / "README.md").read_text().split("## Set-up", 1)[1].split("```bash\n", 1)[1]
    command = setup.split("```", 1)[0].strip().split("&&")[-1].strip()
    assert command.startswith("bench run "), command
    return shlex.split(command)[1:]


def reference_figures(row: str) -> list[str]:
    """The row's reference mIoU as the table gives it, read from the spec file (not through the harness)."""
    text = yaml.safe_load((PROJECT_ROOT / "experiments" / f"{row}.yaml").read_text())
    return [repr(float(v)) for v in text["reference"]["miou"]]


def carries_reference(text: str, figures: list[str]) -> list[str]:
    found = [f for f in figures if re.search(rf"(?<![\d.]){re.escape(f)}(?!\d)", text)]
    found += [w for w in ("Δ", "delta", "reference_miou") if w in text]
    return found + VERDICT_WORDS.findall(text)


def test_the_main_job_says_nothing_of_cityscapes_and_names_its_weights(synthetic_root, one_thread, tmp_path):
    args = main_job()
    assert args == ["run", "--row", "sf_seg_v2-ema", "--synthetic"]
    figures = reference_figures("sf_seg_v2-ema")
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    (record,) = load_records(dataset="synthetic")

    # the closing line: the EMA headline, then the raw figure, and no reference
    closing = next(line for line in result.output.splitlines() if line.startswith("sf_seg_v2-ema seed 0 on synthetic"))
    assert f"mIoU {record.miou:.2f} (EMA, best at" in closing and f"; raw {record.miou_best:.2f}" in closing
    assert not carries_reference(closing, figures), closing

    # the record: headline of the EMA weights, no reference or delta field
    assert record.miou_weights == "ema" and record.miou == record.miou_ema_best
    written = json.loads(Path(str(record.path)).read_text())
    assert not {k for k in written if "reference" in k or "delta" in k}, sorted(written)
    assert not carries_reference(json.dumps({k: v for k, v in written.items() if k != "plan"}), figures)

    # run.json and the card in the run folder
    (folder,) = (runs_dir() / "synthetic" / "sf_seg_v2-ema").iterdir()
    assert not carries_reference((folder / "run.json").read_text(), figures)
    card = (folder / "report.md").read_text()
    verdict_section = card.split("## Row and verdict", 1)[1].split("## ", 1)[0]
    assert "no reference, no Δ and no verdict" in verdict_section
    assert not carries_reference(verdict_section.replace("no reference, no Δ and no verdict", ""), figures)
    assert not carries_reference(card.split("## Counting rule", 1)[1].split("## Recipe", 1)[0], figures)
    per_class = card.split("## Per-class IoU", 1)[1]
    assert "| class | IoU (raw weights) | IoU (EMA weights) |" in per_class
    final_row = next(line for line in per_class.splitlines() if line.startswith("| **mIoU** (final evaluation)"))
    assert final_row == f"| **mIoU** (final evaluation) | {record.miou_final:.2f} | {record.miou_ema:.2f} |"
    road = next(line for line in per_class.splitlines() if line.startswith("| road |"))
    assert road == (f"| road | {record.per_class_iou['road']:.2f} | "
                    f"{record.per_class_iou_ema['road']:.2f} |")

    # the MLflow run: no reference tag or metric; the curves name their weights
    client = MlflowClient(default_tracking_uri())
    mlflow_run = client.get_run(record.tracking_run_id)
    tags, metrics = mlflow_run.data.tags, mlflow_run.data.metrics
    assert not {k for k in tags if k.startswith("reference")}, tags
    assert not {k for k in metrics if "reference" in k or "delta" in k}, sorted(metrics)
    assert not carries_reference(json.dumps({k: v for k, v in tags.items() if not k.startswith("mlflow.")}), figures)
    assert metrics["miou"] == pytest.approx(record.miou, abs=1e-4)
    assert "val/miou" not in metrics
    raw_curve = client.get_metric_history(record.tracking_run_id, "val/miou_raw")
    ema_curve = client.get_metric_history(record.tracking_run_id, "val/miou_ema")
    assert max(raw_curve, key=lambda m: m.step).value == pytest.approx(record.miou_final, abs=1e-4)
    assert max(ema_curve, key=lambda m: m.step).value == pytest.approx(record.miou_ema, abs=1e-4)
    assert max(m.value for m in ema_curve) == pytest.approx(record.miou, abs=1e-4)
    (tmp_path / "artifact").mkdir()
    card_artifact = Path(client.download_artifacts(record.tracking_run_id, "report.md", str(tmp_path / "artifact")))
    assert "no reference, no Δ and no verdict" in card_artifact.read_text()
