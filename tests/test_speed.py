"""`bench speed`: every mode runs on the CPU at small sizes, prints every column and writes a record whose
figures agree with each other; the timing, the out-of-memory retry and the FLOP count each do what they say."""

from __future__ import annotations

import json
import re

import pytest
import torch
from click.testing import CliRunner

from harness.cli import main
from harness.config.spec import load_spec
from harness.data.png import installed_decoders, loader_decoder
from harness.engine import benchmark
from harness.errors import BenchError
from harness.launch import speed
from harness.report.records import SpeedRecord, write_speed_record


def test_speed_on_cpu_prints_every_column_and_writes_a_consistent_record(isolated_outputs, one_thread):
    result = CliRunner().invoke(main, ["speed", "--device", "cpu", "--row", "sf_seg_v2", "--batch", "2",
                                       "--size", "64,32", "--warmup", "0", "--repeats", "2", "--steps", "1",
                                       "--workers", "0"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    header = lines[0]
    for column in speed.COLUMNS:
        assert column in header
    modes = {"train", "infer", "eval", "data", "data cached", "augment"} | (
        {"data pillow"} if loader_decoder() != "pillow" else set())
    rows = {re.match(r"sf_seg_v2\s+(.+?)( \(\d+ workers\))?\s{2,}", line).group(1): line
            for line in lines[2 : 2 + len(modes)]}
    assert set(rows) == modes
    for mode in ("train", "infer"):  # every measured column filled: no "-" left but the notes
        assert " - " not in rows[mode].removesuffix(" -")
    assert f"decoding PNGs with {loader_decoder()} (one core decodes" in rows["data"]
    assert "decoded frames" in rows["data cached"]
    assert re.search(r"PNG decode floors, one core, image \+ label: pillow \d+\.\d img/s", result.output)
    assert "on cpu" in rows["augment"] and "0 workers" in rows["eval"]

    # a CPU's record stays out of git and of benchmark.md unless --keep-record: under runs/speed/
    assert not (isolated_outputs / "results" / "speed").exists()
    (path,) = (isolated_outputs / "runs" / "speed").glob("*/sf_seg_v2/*.json")
    assert path.parent.parent.name == speed.device_name(torch.device("cpu"))
    record = json.loads(path.read_text())
    assert record["kind"] == "speed" and record["precision"] == "fp32" and record["matmul_peak_dtype"] == "float32"
    for mode in ("train", "infer"):
        entry = record["modes"][mode]
        assert entry["batch"] == 2 and entry["size"] == [64, 32] and len(entry["step_s_repeats"]) == 2
        assert entry["images_per_s"] == pytest.approx(2 / entry["step_s"])
        assert entry["step_s"] == pytest.approx(sorted(entry["step_s_repeats"])[0] / 2 + sorted(entry["step_s_repeats"])[1] / 2)
        assert entry["achieved_tflops"] == pytest.approx(entry["flops_per_image"] * entry["images_per_s"] / 1e12)
        assert entry["mfu"] == pytest.approx(entry["achieved_tflops"] / record["matmul_peak_tflops"])
        plain = entry["plain_fp32_nchw"]
        assert entry["speedup_over_plain"] == pytest.approx(entry["images_per_s"] / plain["images_per_s"])
        assert entry["peak_memory_gib"] > 0
    assert record["modes"]["train"]["flops_per_image"] > 2 * record["modes"]["infer"]["flops_per_image"]
    data, cached, augment, evaluation = (record["modes"][m] for m in ("data", "data cached", "augment", "eval"))
    for loading in (data, cached):
        assert loading["batch"] == 2 and loading["workers"] == 0 and loading["images_per_s"] > 0
        assert "generated 64x32" in loading["images"] and len(loading["step_s_repeats"]) == 2
    assert augment["batch"] == 2 and augment["images_per_s"] == pytest.approx(2 / augment["step_s"])
    assert evaluation["batch"] == 1 and len(evaluation["step_s_repeats"]) == 2 and evaluation["images_per_s"] > 0
    assert "generated 64x32" in evaluation["images"] and evaluation["test_mode"] == "whole"
    assert evaluation["fraction_of_forward"] is None  # infer ran at batch 2 here: not the same unit of work


def test_infer_flops_are_the_bench_list_sizes_figure():
    from harness.models.sizes import measure_spec

    spec = load_spec("sf_seg_v2")
    assert benchmark.inference_flops(spec, *spec.columns.test_size) == measure_spec(spec).flops


def test_training_flops_count_forward_and_backward(monkeypatch):
    """A 1x1 convolution: forward 2 x 3 x 19 FLOPs per pixel; backward computes only the weight gradient (the
    images need none), as many again."""
    from harness.models import sizes

    monkeypatch.setattr(sizes, "meta_model", lambda spec: torch.nn.Conv2d(3, 19, 1, bias=False).to("meta"))
    assert sizes.training_flops(None, 8, 4) == 2 * (2 * 3 * 19 * 8 * 4)


def test_timing_gives_one_figure_per_repeat_after_the_warm_up():
    """A clock the steps advance by hand: 2 warm-up steps, then 3 repeats of 2 steps of 30, 10 and 20 ms."""
    now = [0.0]
    durations = iter([0.5, 0.5, 0.03, 0.03, 0.01, 0.01, 0.02, 0.02])

    def step():
        now[0] += next(durations)

    times = benchmark.time_steps(step, torch.device("cpu"), warmup=2, repeats=3, steps=2, clock=lambda: now[0])
    assert times == pytest.approx([0.03, 0.01, 0.02], abs=1e-12)


def test_out_of_memory_retries_with_a_smaller_batch():
    tried = []

    def measure(batch):
        tried.append(batch)
        if batch > 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return benchmark.Timing(batch, 0.1, [0.1], None)

    assert benchmark.with_batch_retry(measure, 8, torch.device("cpu")).batch == 3
    assert tried == [8, 6, 4, 3]  # timm's decay_batch_step

    def broken(batch):
        raise ValueError("not a memory problem")

    with pytest.raises(ValueError):
        benchmark.with_batch_retry(broken, 8, torch.device("cpu"))
    with pytest.raises(BenchError, match="not even one image"):
        benchmark.with_batch_retry(lambda b: measure(10), 2, torch.device("cpu"))


@pytest.mark.parametrize("args,message", [
    (["--size", "64"], "--size 64: give WIDTH,HEIGHT"),
    (["--size", "0,32"], "--size 0,32: give WIDTH,HEIGHT"),
    (["--batch", "0"], "--batch must be at least 1"),
    (["--warmup", "-1"], "--warmup must be at least 0, got -1"),
])
def test_bad_options_fail_with_one_line(args, message):
    result = CliRunner().invoke(main, ["speed", "--device", "cpu", "--row", "sf_seg_v2", *args])
    assert result.exit_code == 2
    assert result.output.strip().startswith("error: ") and message in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_device_name_is_folder_safe():
    name = speed.device_name(torch.device("cpu"))
    assert name and all(c.isalnum() or c == "-" for c in name)


def test_data_mode_reads_a_given_dataset_with_workers(tmp_path, one_thread, monkeypatch):
    from harness.data.synthetic import write_synthetic

    root = write_synthetic(tmp_path / "tree", train_images=3, val_images=0, size=(64, 32), progress=False)
    # The floors are measured before and after the loader; a slow moment of the host must not lower either.
    measured = iter([{name: 100.0 + i for i, name in enumerate(installed_decoders())},
                     {name: 110.0 - i for i, name in enumerate(installed_decoders())}])
    monkeypatch.setattr(benchmark, "measure_decode_floors", lambda sample: next(measured))
    record = speed.speed(benchmark.SpeedOptions(row="sf_seg_v2", mode="data", batch=2, device="cpu", data_root=str(root),
                                            workers=1, warmup=0, repeats=2, steps=1))
    data = record.modes["data"]
    assert set(record.modes) - {"data pillow"} == {"data", "data cached", "augment"} and str(root) in data["images"]
    assert data["decode_floors"] == {name: max(100.0 + i, 110.0 - i) for i, name in enumerate(installed_decoders())}
    assert data["decoder"] == loader_decoder()
    assert data["fraction_of_floor"] == pytest.approx(data["images_per_s_per_worker"] / data["decode_floor_images_per_s"])
    assert record.matmul_peak_tflops is None and data["workers"] == 1 and len(data["step_s_repeats"]) == 2
    assert data["images_per_s_per_worker"] == pytest.approx(data["images_per_s"])


def test_eval_mode_is_the_evaluation_loop_and_reports_its_share_of_the_forward_rate(isolated_outputs, one_thread):
    shares = []
    for _ in range(3):
        record = speed.speed(benchmark.SpeedOptions(row="df_seg_v1", mode="all", device="cpu", size=(64, 32), warmup=1,
                                                repeats=5, steps=3, workers=0, plain=False))
        infer, evaluation = record.modes["infer"], record.modes["eval"]
        assert infer["batch"] == evaluation["batch"] == 1 and infer["size"] == evaluation["size"]
        assert evaluation["fraction_of_forward"] == pytest.approx(evaluation["images_per_s"] / infer["images_per_s"])
        shares.append(evaluation["fraction_of_forward"])
        # The loop does the forward and more (decoding, resizing, scoring), so it cannot be much faster than it. The
        # two are timed one after the other for milliseconds, and a burst of another process's load (the other test
        # worker's) in the forward's turn makes the loop look faster; load only ever slows, so a quiet try settles it.
        if 0 < shares[-1] < 1.5:
            break
    else:
        pytest.fail(f"the evaluation loop timed faster than its own forward in 3 tries: {shares}")
    assert "% of infer" in speed.render(record)


def speed_record(row: str, device: str, device_type: str, size: list[int], batch: int, images_per_s: float,
                 time_: str) -> SpeedRecord:
    return SpeedRecord(
        row=row, device=device, device_type=device_type, device_memory_gib=None,
        precision="bf16" if device_type == "cuda" else "fp32", compile=False, channels_last=device_type == "cuda",
        cpu_threads=2, matmul_peak_tflops=None, matmul_peak_dtype=None, warmup=1, repeats=1, steps=1,
        modes={"infer": {"size": size, "batch": batch, "images_per_s": images_per_s, "step_s": batch / images_per_s,
                         "peak_memory_gib": None}},
        git_commit="abc", versions={}, time=time_)


def test_benchmark_md_shows_the_inference_rate_at_full_size_naming_the_device(isolated_outputs):
    from harness.report.table import INFER_COLUMN, NOT_MEASURED, render

    for record in [
        speed_record("sf_seg_v2", "nvidia-h100", "cuda", [2048, 1024], 1, 204.25, "2026-11-01T00:00:00Z"),
        speed_record("sf_seg_v2", "nvidia-a100", "cuda", [2048, 1024], 1, 99.0, "2026-10-01T00:00:00Z"),  # older
        speed_record("sf_seg_v2", "cpu-x", "cpu", [2048, 1024], 1, 0.5, "2026-12-01T00:00:00Z"),  # a CPU's figure
        speed_record("df_seg_v2", "nvidia-h100", "cuda", [256, 128], 1, 900.0, "2026-11-01T00:00:00Z"),  # other size
        speed_record("pspnet-r50", "nvidia-h100", "cuda", [2048, 1024], 8, 60.0, "2026-11-01T00:00:00Z"),  # batch 8
    ]:
        write_speed_record(record)
    text = render("cityscapes")
    header = next(line for line in text.splitlines() if line.startswith("| row "))
    assert INFER_COLUMN in header
    cells = {line.split("|")[1].strip(): line.split("|")[-2].strip() for line in text.splitlines()
             if line.startswith("| ") and not line.startswith("| row ")}
    assert cells["sf_seg_v2"] == "204.2 (nvidia-h100, bf16)"
    assert cells["sf_seg_v2-lightseg"] == cells["sf_seg_v2"]  # the base row's network
    assert cells["deeplabv3-r50"] == NOT_MEASURED  # no record at all
    # a record the column cannot show says why, and how to measure what it shows
    assert cells["df_seg_v2"].startswith(NOT_MEASURED) and "timed 256x128, batch 1" in cells["df_seg_v2"]
    assert "nvidia-h100" in cells["df_seg_v2"] and "--size 2048,1024" in cells["df_seg_v2"]
    assert cells["pspnet-r50"].startswith(NOT_MEASURED) and "timed 2048x1024, batch 8" in cells["pspnet-r50"]


def test_many_rows_in_one_call_stop_at_the_budget_and_list_the_rest(isolated_outputs, one_thread):
    """`--rows` measures rows one after another, a record each; a row that would end past `--budget-s` (the time
    spent plus the mean time of the rows measured) is not started, and the summary names every such row."""
    readings = iter(range(0, 1000, 10))  # each reading 10 s after the last: every row measured "takes" 10 s
    options = benchmark.SpeedOptions(row="", mode="infer", device="cpu", size=(32, 32), warmup=0, repeats=1, steps=1)
    shown: list[str] = []
    outcome = speed.speed_rows("df_seg*", options, budget_s=25, echo=shown.append,
                               clock=lambda: float(next(readings)))
    rows = [spec.row for spec in speed.select_rows("df_seg*")]
    assert rows == ["df_seg_v1", "df_seg_v1-mseg", "df_seg_v1-ema", "df_seg_v2", "df_seg_v2-ema"]  # light-seg: once
    # rows started at 0 and 10 (10 s each, so 10 s expected of the next): a third would end at 30, past 25
    assert [r.row for r in outcome.records] == rows[:2] and outcome.not_reached == rows[2:]
    assert len(shown) == 2 and all(f"record {r.path}" in text for r, text in zip(outcome.records, shown))
    written = sorted(p.parent.name for p in (isolated_outputs / "runs" / "speed").glob("*/*/*.json"))
    assert written == sorted(rows[:2])
    assert speed.rows_summary(outcome).endswith("not reached within --budget-s 25 (3): " + ", ".join(rows[2:]))


def test_row_and_rows_are_one_or_the_other():
    for args in ([], ["--row", "df_seg_v1", "--rows", "df_seg*"], ["--row", "df_seg_v1", "--budget-s", "9"]):
        result = CliRunner().invoke(main, ["speed", "--device", "cpu", *args])
        assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
