"""`bench plan` figures from a fixture `bench speed` record (measured) and from FLOPs and the recorded peak
(estimate); `bench doctor`'s memory check from the same record; `bench sweep --dry-run` choosing Slurm's --time from
the plan and warning on a too-short one."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from harness.cli import main
from harness.config.plan import planned_iterations
from harness.config.spec import load_spec
from harness.paths import results_dir
from harness.report.estimates import ASSUMED_MFU, evaluations

DEVICE = "fixture-gpu"
TRAIN_RATE, EVAL_RATE, PEAK_TFLOPS = 40.0, 20.0, 500.0


def write_record(**change) -> Path:
    record = {"kind": "speed", "row": "df_seg_v1", "dataset": DEVICE, "device": DEVICE, "device_type": "cuda",
              "device_memory_gib": 80.0, "precision": "bf16", "matmul_peak_tflops": PEAK_TFLOPS,
              "matmul_peak_dtype": "bfloat16", "time": "2026-01-01T00:00:00Z", "compile": False,
              "channels_last": True, "cpu_threads": 8, "warmup": 10, "repeats": 5, "steps": 10, "git_commit": "abc",
              "versions": {},
              "modes": {"train": {"size": [1024, 1024], "batch": 16, "images_per_s": TRAIN_RATE,
                                  "step_s": 16 / TRAIN_RATE, "peak_memory_gib": 30.0, "flops_per_image": 1e11},
                        "eval": {"size": [2048, 1024], "batch": 1, "images_per_s": EVAL_RATE, "step_s": 1 / EVAL_RATE,
                                 "peak_memory_gib": None}}}
    record.update(change)
    path = results_dir() / "speed" / DEVICE / "df_seg_v1" / "20260101T000000Z-norun.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))
    return path


@pytest.fixture
def fixture_record() -> Path:
    return write_record()


def measured_gpu_hours() -> float:
    """df_seg_v1's run at the fixture's rates: its planned crops at the train rate, each evaluation at the eval rate."""
    spec = load_spec("df_seg_v1")
    iters = planned_iterations(spec)
    evals = evaluations(iters, spec.train.eval_every_epochs * math.ceil(2975 / spec.columns.batch_size))
    return (iters * spec.columns.batch_size / TRAIN_RATE + evals * 500 / EVAL_RATE) / 3600


def cells(output: str, row: str) -> list[str]:
    line = next(line for line in output.splitlines() if line.startswith(row + " "))
    return re.split(r"\s{2,}", line.strip())


def test_plan_prints_per_row_and_total_figures_and_labels_estimates(fixture_record):
    result = CliRunner().invoke(main, ["plan", "--rows", "df_seg_v1,df_seg_v1-lightseg,df_seg_v2", "--device", DEVICE,
                                       "--gpus", "8", "--seeds", "2"])
    assert result.exit_code == 0, result.output
    measured = cells(result.output, "df_seg_v1")
    gpu_hours = measured_gpu_hours()
    assert measured[1] == f"{planned_iterations(load_spec('df_seg_v1')):,}"
    assert measured[4] == f"{gpu_hours:,.1f}" and measured[6] == f"{2 * gpu_hours:,.1f}"
    minutes = math.ceil(gpu_hours / 8 * 60)
    assert measured[5] == f"{minutes // 60}:{minutes % 60:02d}"
    assert measured[7] == f"measured on {DEVICE}"
    shared = cells(result.output, "df_seg_v1-lightseg")
    assert shared[6] == "shared (df_seg_v1)"
    estimated = cells(result.output, "df_seg_v2")
    assert estimated[7].startswith(f"estimate: FLOPs at {100 * ASSUMED_MFU:.0f}% of {DEVICE}'s "
                                   f"{PEAK_TFLOPS:.3g} TFLOP/s")
    total = next(line for line in result.output.splitlines() if line.startswith("total:"))
    assert "2 training row(s) x 2 seed(s) = 4 run(s)" in total and "(1 row(s) measured, 1 estimated)" in total
    listed = float(re.search(r"([\d,.]+) GPU-hours", total).group(1).replace(",", ""))
    assert listed == pytest.approx(2 * gpu_hours + float(estimated[6].replace(",", "")), abs=0.15)


def test_doctor_checks_gpu_memory_against_the_record(fixture_record, tmp_path):
    def memory(gpus: str) -> str:
        result = CliRunner().invoke(main, ["doctor", "--row", "df_seg_v1", "--device", DEVICE, "--gpus", gpus,
                                           "--data-root", str(tmp_path)])
        line = next(line for line in result.output.splitlines() if line.startswith("GPU memory "))
        assert "from a bench speed record: 30.0 GiB at batch 16" in line, line
        return re.split(r"\s{2,}", line)[1]

    assert memory("1") == "go"  # the recorded batch itself: 30 GiB of 80
    write_record(device_memory_gib=16.0)
    assert memory("1") == "no-go"  # 16 images per GPU: 30 GiB of 16
    assert memory("8") == "go"  # 2 images per GPU: the per-image part an eighth


def test_sweep_dry_run_chooses_time_from_the_plan_and_warns_on_a_short_one(fixture_record, tmp_path):
    root = tmp_path / "cityscapes"
    root.mkdir()
    args = ["sweep", "--rows", "df_seg_v1", "--data-root", str(root), "--executor", "slurm", "--dry-run",
            "--tracking-uri", "http://127.0.0.1:9"]  # a shared server's URI: only a dry run, never reached
    chosen = CliRunner().invoke(main, args)
    assert chosen.exit_code == 0, chosen.output
    wall = math.ceil(measured_gpu_hours() / 8 * 60)
    minutes = 15 * math.ceil(wall * 1.25 / 15)
    assert f"--time {minutes // 60}:{minutes % 60:02d}:00 chosen by `bench plan`" in chosen.output
    assert f"#SBATCH --time={minutes}\n" in chosen.output
    assert "no-go: starting weights:" in chosen.output and "no-go check(s) above would stop" in chosen.output

    short = CliRunner().invoke(main, [*args, "--time", "0:10:00"])
    assert short.exit_code == 0, short.output
    assert f"warning: --time 0:10:00 is shorter than the estimated wall time of 1 job(s) (df_seg_v1 " \
           f"{wall // 60}:{wall % 60:02d})" in short.output
    assert "#SBATCH --time=10\n" in short.output and "chosen by" not in short.output
