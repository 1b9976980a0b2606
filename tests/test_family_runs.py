"""Every family trains through the same `bench run` loop, and `bench list --sizes` measures what it shows."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from torch.utils.flop_counter import FlopCounterMode

from harness.cli import main
from harness.config.spec import load_all, load_ours, load_spec
from harness.models import build_model
from harness.report.records import load_records
from tests.helpers import experiments_with

# One row of each family; the EMA and light-seg variants share its network.
ONE_ROW_PER_FAMILY = ["deeplabv3-r50", "pspnet-r50", "bisenet-r18", "icnet-r50", "unet-769", "df_seg_v1", "sf_seg_v2-ema"]


@pytest.mark.slow
@pytest.mark.parametrize("row", ONE_ROW_PER_FAMILY)
def test_bench_run_synthetic_records_a_result(row, synthetic_root):
    result = CliRunner().invoke(main, ["run", "--row", row, "--synthetic", "--iters", "1"])
    assert result.exit_code == 0, result.output
    (record,) = load_records(dataset="synthetic")
    assert record.row == row and record.iterations == 1 and len(record.per_class_iou) == 19
    assert 0.0 <= record.miou <= 100.0
    assert (record.miou_ema is not None) == load_spec(row).columns.ema


def size_columns() -> dict[str, dict[str, str]]:
    result = CliRunner().invoke(main, ["list", "--sizes"])
    assert result.exit_code == 0, result.output
    header, _, *lines = result.output.splitlines()
    names = ["row", "model", "backbone", "ema", "bs", "epochs", "reference", "test size", "params (M)",
             "inference params (M)", "GFLOPs"]
    starts = [header.index(name) for name in names]
    ends = starts[1:] + [None]
    return {line[:starts[1]].strip(): {n: line[s:e].strip() for n, s, e in zip(names, starts, ends)} for line in lines}


# UP's parameter counts (../shared/reference/architectures.md, "What UP trained, per family"), in millions, for 19
# classes with the training-only heads; BiSeNet's is 13.70M + 0.54M of aux heads.
UP_PARAMS = {"deeplabv3-r50": "44.16", "deeplabv3-r101": "63.15", "pspnet-r50": "34.66", "bisenet-r18": "14.24",
             "icnet-r50": "30.71", "unet-1024-ema": "17.27", "df_seg_v1": "9.37", "df_seg_v2": "18.83",
             "sf_seg_v1": "8.59", "sf_seg_v2": "18.04"}


def test_list_sizes_shows_every_row_with_ups_parameter_count():
    table = size_columns()
    assert list(table) == [s.row for s in load_all() + load_ours()]  # the table's rows, then ours
    for row, params in UP_PARAMS.items():
        assert table[row]["params (M)"] == params, row
        assert table[row]["test size"] == "2048x1024"
    assert table["bisenet-r18"]["inference params (M)"] == "13.70"  # UP's network without its aux heads
    # Training-only heads are not part of inference: PSPNet's FCN head, none in DF-Seg.
    assert float(table["pspnet-r50"]["inference params (M)"]) < float(table["pspnet-r50"]["params (M)"])
    assert table["df_seg_v1"]["inference params (M)"] == table["df_seg_v1"]["params (M)"]


def test_list_sizes_gflops_are_a_real_forward_at_the_rows_test_size(tmp_path, monkeypatch):
    """The meta-device count equals FlopCounterMode around a real forward, and follows the row's test size."""
    monkeypatch.setenv("SEGBENCH_EXPERIMENTS", str(experiments_with(tmp_path, {
        "sf-small": {"inherit": "sf_seg_v1", "columns": {"test_size": [512, 256]}, "reference": {"miou": [1.0]}},
        "sf-wide": {"inherit": "sf_seg_v1", "columns": {"test_size": [1024, 256]}, "reference": {"miou": [1.0]}},
    })))
    model = build_model(load_spec("sf-small")).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, 256, 512))
    table = size_columns()
    assert table["sf-small"]["GFLOPs"] == f"{counter.get_total_flops() / 1e9:.1f}"
    assert table["sf-small"]["test size"] == "512x256"
    small, wide = float(table["sf-small"]["GFLOPs"]), float(table["sf-wide"]["GFLOPs"])
    assert 1.8 < wide / small < 2.2  # twice the pixels, about twice the work
