"""`bench plan` figures from a fixture `bench speed` record (measured), from FLOPs at a peak times the MFU a record of
the network family reached (calibrated) or an assumed one; a GPU of the catalogue named by short or torch name, this
host's lack of a GPU refused without a GPU record, an unknown name refused with the nearest; `bench doctor`'s memory
check from the same record or estimated against the catalogue's memory; `bench sweep --dry-run` choosing Slurm's
--time from the plan and warning on a too-short one."""

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
from harness.models.sizes import inference_flops, training_step
from harness.paths import results_dir
from harness.report import estimates
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


@pytest.fixture(autouse=True)
def model_costs_cache(tmp_path_factory, monkeypatch):
    """FLOPs and sizes counted once per test session, under tmp (never the checkout's .cache/)."""
    monkeypatch.setenv("SEGBENCH_CACHE", str(tmp_path_factory.getbasetemp() / "model-costs-cache"))


@pytest.fixture
def fixture_record() -> Path:
    return write_record()


# df_seg_v1 as the table gives it (seed-table.md): 180 epochs at batch 16 over Cityscapes' 2,975 train images, UP's
# epoch being ceil(2975 / 16) = 186 iterations (the last batch padded); it evaluates every 5 epochs (930 iterations)
# and at the end: after 930, 1860, ..., 32550 (35 times) and at 33,480, on the 500 val images.
DF_SEG_V1_ITERATIONS = 180 * 186  # 33,480
DF_SEG_V1_EVALUATIONS = 36


def measured_gpu_hours() -> float:
    """df_seg_v1's run at the fixture's rates: its planned crops at the train rate, each evaluation at the eval rate."""
    return (DF_SEG_V1_ITERATIONS * 16 / TRAIN_RATE + DF_SEG_V1_EVALUATIONS * 500 / EVAL_RATE) / 3600  # 3.97 h


def cells(output: str, row: str) -> list[str]:
    line = next(line for line in output.splitlines() if line.startswith(row + " "))
    return re.split(r"\s{2,}", line.strip())


def test_plan_prints_per_row_and_total_figures_and_labels_estimates(fixture_record):
    result = CliRunner().invoke(main, ["plan", "--rows", "df_seg_v1,df_seg_v1-lightseg,df_seg_v2", "--device", DEVICE,
                                       "--gpus", "8", "--seeds", "2"])
    assert result.exit_code == 0, result.output
    measured = cells(result.output, "df_seg_v1")
    gpu_hours = measured_gpu_hours()
    assert measured[1] == "33,480"
    assert measured[4] == f"{gpu_hours:,.1f}" and measured[6] == f"{2 * gpu_hours:,.1f}"
    minutes = math.ceil(gpu_hours / 8 * 60)
    assert measured[5] == f"{minutes // 60}:{minutes % 60:02d}"
    assert measured[7] == f"measured on {DEVICE}"
    shared = cells(result.output, "df_seg_v1-lightseg")
    assert shared[6] == "shared (df_seg_v1)"
    calibrated = cells(result.output, "df_seg_v2")  # the same family: df_seg_v1's MFU against the recorded peak
    mfu = TRAIN_RATE * 1e11 / (PEAK_TFLOPS * 1e12)
    assert calibrated[7].startswith(f"train calibrated on {DEVICE}: MFU {100 * mfu:.1f}% (df_seg_v1); "
                                    f"eval assumed: MFU {100 * ASSUMED_MFU:.0f}%"), calibrated[7]
    total = next(line for line in result.output.splitlines() if line.startswith("total:"))
    assert "2 training row(s) x 2 seed(s) = 4 run(s)" in total and "(row(s): 1 measured, 1 calibrated, 0 assumed)" \
        in total
    listed = float(re.search(r"([\d,.]+) GPU-hours", total).group(1).replace(",", ""))
    assert listed == pytest.approx(2 * gpu_hours + float(calibrated[6].replace(",", "")), abs=0.15)


H100_BF16_TFLOPS = 989.4  # NVIDIA H100 SXM5 datasheet: 1,979 TFLOP/s bf16 with sparsity, half of it dense
A100_BF16_TFLOPS = 312.0  # NVIDIA A100 datasheet: bf16 tensor core, dense


def row_hours(row: str, train_rate: float, infer_rate: float) -> float:
    """One run of `row` on Cityscapes at these rates: its planned crops, and every evaluation's val images."""
    spec = load_spec(row)
    iters = planned_iterations(spec)
    evals = evaluations(iters, spec.train.eval_every_epochs * math.ceil(2975 / spec.columns.batch_size))
    models = 2 if spec.columns.ema else 1
    return (iters * spec.columns.batch_size / train_rate + evals * 500 * models / infer_rate) / 3600


def assumed_hours(row: str, tflops: float) -> float:
    spec = load_spec(row)
    train = training_step(spec, *spec.train.crop_size).flops
    infer = inference_flops(spec, *spec.columns.test_size)
    peak = tflops * 1e12 * ASSUMED_MFU
    return row_hours(row, peak / train, peak / infer)


@pytest.fixture
def no_gpu_here(monkeypatch, tmp_path):
    """This host seen without an NVIDIA driver listing a GPU, whatever it has."""
    monkeypatch.setattr(estimates, "NVIDIA_GPUS", tmp_path / "no-nvidia-gpus")


def test_plan_for_a_named_gpu_of_the_catalogue_labels_each_row_assumed_with_the_datasheet(no_gpu_here):
    result = CliRunner().invoke(main, ["plan", "--rows", "all", "--gpus", "8", "--device", "h100"])
    assert result.exit_code == 0, result.output
    for row in ("df_seg_v1", "deeplabv3-r50", "unet-1024"):
        found = cells(result.output, row)
        assert found[7] == f"assumed: MFU {100 * ASSUMED_MFU:.0f}%", found
        assert float(found[4].replace(",", "")) == pytest.approx(assumed_hours(row, H100_BF16_TFLOPS), abs=0.06)
    lines = result.output.splitlines()
    assert next(line for line in lines if line.startswith("total:")).startswith(
        "total: 25 training row(s) x 1 seed(s) = 25 run(s)")
    source = next(line for line in lines if line.startswith("device: "))
    assert "H100 SXM5 80GB" in source and "989.4 TFLOP/s dense bf16" in source and "source: NVIDIA H100" in source
    assert "CPU" not in result.output

    by_torch_name = CliRunner().invoke(main, ["plan", "--rows", "df_seg_v1", "--device", "NVIDIA H100 80GB HBM3"])
    assert by_torch_name.exit_code == 0, by_torch_name.output
    assert cells(by_torch_name.output, "df_seg_v1") == cells(result.output, "df_seg_v1")


def test_without_a_gpu_or_a_gpu_record_plan_refuses_in_one_line_and_cpu_figures_are_cpu_hours(no_gpu_here):
    result = CliRunner().invoke(main, ["plan", "--rows", "df_seg_v1", "--gpus", "8"])
    assert result.exit_code == 2 and result.stdout == "", result.output
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: no GPU on this machine and no GPU speed record") and "--device" in line

    cpu = CliRunner().invoke(main, ["plan", "--rows", "df_seg_v1", "--device", "cpu"])
    assert cpu.exit_code == 0, cpu.output
    assert "GPU" not in cpu.output and "CPU-hours on cpu" in cpu.output

    path = write_record()  # a GPU speed record: its device is the one priced
    newest = CliRunner().invoke(main, ["plan", "--rows", "df_seg_v1", "--gpus", "8"])
    assert newest.exit_code == 0, newest.output
    assert cells(newest.output, "df_seg_v1")[7] == f"measured on {DEVICE}"
    assert f"device: {DEVICE}, the newest GPU speed record ({path})" in newest.output


def test_a_gpu_record_of_one_family_calibrates_that_family_on_another_gpu(no_gpu_here):
    train_flops, infer_flops = 1e11, 4e11
    a100 = "nvidia-a100-sxm4-80gb"  # how `bench speed` files torch's "NVIDIA A100-SXM4-80GB"
    record = {"kind": "speed", "row": "df_seg_v1", "dataset": a100, "device": a100,
              "device_type": "cuda", "device_memory_gib": 79.2, "precision": "bf16", "matmul_peak_tflops": 250.0,
              "matmul_peak_dtype": "bfloat16", "time": "2026-01-01T00:00:00Z", "compile": False,
              "channels_last": True, "cpu_threads": 8, "warmup": 10, "repeats": 5, "steps": 10, "git_commit": "abc",
              "versions": {},
              "modes": {"train": {"size": [1024, 1024], "batch": 16, "images_per_s": 62.4, "peak_memory_gib": 30.0,
                                  "step_s": 16 / 62.4, "flops_per_image": train_flops},
                        "infer": {"size": [2048, 1024], "batch": 1, "images_per_s": 23.4, "step_s": 1 / 23.4,
                                  "peak_memory_gib": None, "flops_per_image": infer_flops}}}
    path = results_dir() / "speed" / record["device"] / "df_seg_v1" / "20260101T000000Z-norun.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(record))
    result = CliRunner().invoke(main, ["plan", "--rows", "df_seg_v2,pspnet-r50", "--device", "h100"])
    assert result.exit_code == 0, result.output
    train_mfu = 62.4 * train_flops / (A100_BF16_TFLOPS * 1e12)
    infer_mfu = 23.4 * infer_flops / (A100_BF16_TFLOPS * 1e12)
    found = cells(result.output, "df_seg_v2")
    assert found[7] == (f"train calibrated on nvidia-a100-sxm4-80gb: MFU {100 * train_mfu:.1f}% (df_seg_v1); "
                        f"eval calibrated on nvidia-a100-sxm4-80gb: MFU {100 * infer_mfu:.1f}% (df_seg_v1)"), found
    spec = load_spec("df_seg_v2")
    peak = H100_BF16_TFLOPS * 1e12
    expected = row_hours("df_seg_v2", peak * train_mfu / training_step(spec, *spec.train.crop_size).flops,
                         peak * infer_mfu / inference_flops(spec, *spec.columns.test_size))
    assert float(found[4].replace(",", "")) == pytest.approx(expected, abs=0.06)
    assert cells(result.output, "pspnet-r50")[7] == f"assumed: MFU {100 * ASSUMED_MFU:.0f}%"  # another family
    assert "(row(s): 0 measured, 1 calibrated, 1 assumed)" in result.output


@pytest.mark.parametrize("command", [["plan"], ["doctor", "--row", "df_seg_v1"],
                                     ["doctor", "--row", "df_seg_v1", "--synthetic"],
                                     ["sweep", "--rows", "df_seg_v1", "--dry-run", "--executor", "local"]])
def test_an_unknown_device_is_refused_in_one_line_with_the_nearest_names(command):
    result = CliRunner().invoke(main, [*command, "--device", "h10"])
    assert result.exit_code == 2 and result.stdout == "", result.output
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: --device h10: not a GPU of the catalogue") and "did you mean h100" in line


def test_doctor_estimates_memory_against_the_catalogue_without_a_record(tmp_path, no_gpu_here):
    def memory(row: str, device: str, gpus: str) -> tuple[str, str]:
        result = CliRunner().invoke(main, ["doctor", "--row", row, "--device", device, "--gpus", gpus,
                                           "--data-root", str(tmp_path)])
        line = next(line for line in result.output.splitlines() if line.startswith("GPU memory "))
        return re.split(r"\s{2,}", line)[1], line

    verdict, line = memory("unet-1024", "h100", "8")
    assert verdict == "go" and "estimated" in line and "H100 SXM5 80GB has 80 GB" in line, line
    # 8 crops of 1024x1024 on one 16 GB V100: about 4.9 GiB of fp32 activations each, 2.4 in 16 bits
    verdict, line = memory("unet-1024", "v100-16gb", "1")
    assert verdict == "no-go" and "Tesla V100 SXM2 16GB has 16 GB" in line, line


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


def test_sweep_prices_its_time_limit_on_the_named_gpu_and_refuses_without_one(no_gpu_here, tmp_path):
    root = tmp_path / "cityscapes"
    root.mkdir()
    args = ["sweep", "--rows", "df_seg_v1", "--data-root", str(root), "--executor", "slurm", "--dry-run",
            "--tracking-uri", "http://127.0.0.1:9"]  # a shared server's URI: only a dry run, never reached
    refused = CliRunner().invoke(main, args)
    assert refused.exit_code == 2, refused.output
    (line,) = refused.stderr.strip().splitlines()
    assert line.startswith("error: no GPU on this machine and no GPU speed record"), line

    chosen = CliRunner().invoke(main, [*args, "--device", "h100"])
    assert chosen.exit_code == 0, chosen.output
    wall = math.ceil(assumed_hours("df_seg_v1", H100_BF16_TFLOPS) / 8 * 60)
    minutes = 15 * math.ceil(wall * 1.25 / 15)
    assert f"--time {minutes // 60}:{minutes % 60:02d}:00 chosen by `bench plan`: the longest job, df_seg_v1, is " \
           f"estimated at {wall // 60}:{wall % 60:02d} on 8 GPU(s) (assumed: MFU {100 * ASSUMED_MFU:.0f}%)" \
           in chosen.output, chosen.output


def test_flops_are_counted_once_and_kept_in_the_cache_folder(no_gpu_here, tmp_path, monkeypatch):
    from harness.models import sizes
    from harness.report import model_costs

    monkeypatch.setenv("SEGBENCH_CACHE", str(tmp_path / "cache"))
    first = CliRunner().invoke(main, ["plan", "--rows", "icnet-r50", "--device", "a10"])
    assert first.exit_code == 0, first.output
    assert (tmp_path / "cache" / model_costs.CACHE_FILE).is_file()

    def no_counting(*args, **kwargs):
        raise AssertionError("counted again")

    monkeypatch.setattr(sizes, "training_step", no_counting)
    monkeypatch.setattr(sizes, "inference_flops", no_counting)
    monkeypatch.setattr(model_costs, "_COSTS", {})  # a new process: only the file remembers
    again = CliRunner().invoke(main, ["plan", "--rows", "icnet-r50", "--device", "a10"])
    assert again.exit_code == 0, again.output
    assert cells(again.output, "icnet-r50") == cells(first.output, "icnet-r50")

    monkeypatch.setattr(model_costs, "code_digest", lambda: "other model code")
    monkeypatch.setattr(model_costs, "_COSTS", {})
    recounted = CliRunner().invoke(main, ["plan", "--rows", "icnet-r50", "--device", "a10"])
    assert recounted.exit_code != 0 and "counted again" in str(recounted.exception)


@pytest.mark.parametrize("name, key", [
    ("NVIDIA A100-SXM4-80GB", "a100-80gb"), ("NVIDIA A100-SXM4-40GB", "a100-40gb"), ("NVIDIA A100 80GB PCIe",
                                                                                   "a100-80gb-pcie"),
    ("Tesla V100-SXM2-32GB", "v100-32gb"), ("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H100 PCIe", "h100-pcie"),
    ("NVIDIA H200", "h200"), ("NVIDIA B200", "b200"), ("NVIDIA L40S", "l40s"), ("NVIDIA L4", "l4"),
    ("NVIDIA A10", "a10"), ("NVIDIA RTX A6000", "rtx-a6000"), ("NVIDIA GeForce RTX 4090", "rtx-4090"),
    ("NVIDIA GeForce RTX 3090", "rtx-3090"), ("nvidia-h100-80gb-hbm3", "h100"), ("H100", "h100"),
    ("a100-80gb", "a100-80gb")])
def test_the_catalogue_knows_torch_names_folder_names_and_short_names(name, key):
    from harness.config.devices import find_gpu

    found = find_gpu(name)
    assert found is not None and found.key == key and found.source
