"""Rule 5's table part: `bench table` writes benchmark.png beside benchmark.md (linked from it): measured vs
reference per row with the spread, and mIoU against GFLOPs; deterministic bytes, GFLOPs measured once."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

import harness.models.sizes
from harness.cli import main
from harness.config.spec import load_all, load_spec
from harness.paths import benchmark_path
from harness.report.figure import figure_png, gflops_by_row
from harness.report.records import write_result_record
from harness.report.verdicts import row_verdicts
from tests.table_fixtures import full_budget_record


def test_bench_table_writes_the_linked_figure_with_fixed_bytes(tmp_path: Path):
    result = CliRunner().invoke(main, ["table"])
    assert result.exit_code == 0, result.output
    figure = benchmark_path().with_name("benchmark.png")
    assert "](benchmark.png)" in benchmark_path().read_text()
    with Image.open(figure) as image:
        assert image.format == "PNG" and image.width > 1000 and image.height > 800
        assert not {"Software", "Creation Time", "date:create"} & set(image.info)  # nothing that changes per run
    first = figure.read_bytes()
    assert CliRunner().invoke(main, ["table"]).exit_code == 0
    assert figure.read_bytes() == first

    # Measured runs are drawn: the figure changes when a reproduction arrives.
    write_result_record(full_budget_record("sf_seg_v1", 72.6))
    assert CliRunner().invoke(main, ["table"]).exit_code == 0
    assert figure.read_bytes() != first


def test_gflops_are_measured_once_then_read_from_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    specs = [load_spec("sf_seg_v1"), load_spec("sf_seg_v1-ema"), load_spec("df_seg_v1")]
    cache = tmp_path / "sizes.json"
    measured = []
    real = harness.models.sizes.measure_rows
    monkeypatch.setattr(harness.models.sizes, "measure_rows",
                        lambda specs: measured.append([s.row for s in specs]) or real(specs))
    first = gflops_by_row(specs, cache)
    assert measured == [["sf_seg_v1", "sf_seg_v1-ema", "df_seg_v1"]]
    expected = real(specs)
    assert first == {row: size.gflops for row, size in expected.items()}
    assert gflops_by_row(specs, cache) == first and len(measured) == 1  # the second call measures nothing
    # another network (a smaller test size) is a cache miss, measured alone
    small = load_spec("sf_seg_v2")
    gflops_by_row([*specs, small], cache)
    assert measured[1] == ["sf_seg_v2"]


def test_figure_bytes_depend_only_on_the_inputs():
    specs = load_all()
    gflops = {s.row: 100.0 + i for i, s in enumerate(specs)}
    verdicts = row_verdicts(specs, [full_budget_record("sf_seg_v1", v) for v in (72.4, 72.6)])
    png = figure_png(specs, verdicts, gflops)
    assert png.startswith(b"\x89PNG") and figure_png(specs, verdicts, gflops) == png
    assert figure_png(specs, row_verdicts(specs, []), gflops) != png


def test_figure_marks_rows_not_run_lists_only_the_markers_drawn_and_its_labels_do_not_overlap():
    from harness.report.figure import NOT_RUN_COLOUR, build_figure
    from harness.report.verdicts import REPRODUCED

    specs = load_all()
    gflops = gflops_by_row(specs)

    def drawn(records):
        verdicts = row_verdicts(specs, records)
        fig = build_figure(specs, verdicts, gflops)
        fig.canvas.draw()
        return fig, verdicts

    fig, verdicts = drawn([])
    left, right = fig.axes[:2]
    assert [t.get_text() for t in left.get_legend().get_texts()] == ["reference run(s)", "span of the reference runs"]
    assert [t.get_text() for t in left.texts] == ["not run"] * len(specs)
    assert all(label.get_color() == NOT_RUN_COLOUR for label in left.get_yticklabels())
    renderer = fig.canvas.get_renderer()
    labels = [t for t in right.texts if t.get_text()]
    # One label per network of the table: a row and its -ema, -mseg and -lightseg variants share it.
    assert sorted(t.get_text() for t in labels) == sorted([
        "deeplabv3-r50", "deeplabv3-r101", "df_seg_v1", "df_seg_v2", "sf_seg_v1", "sf_seg_v2", "pspnet-r50",
        "bisenet-r18", "icnet-r50", "unet-769", "unet-1024"])
    boxes = [t.get_window_extent(renderer) for t in labels]
    frame = fig.bbox
    for i, box in enumerate(boxes):
        assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1, labels[i]
        for j, other in enumerate(boxes[i + 1:], start=i + 1):
            assert not box.overlaps(other), (labels[i].get_text(), labels[j].get_text())

    fig, verdicts = drawn([full_budget_record("sf_seg_v1", v) for v in (72.4, 72.6)])
    left = fig.axes[0]
    measured = [v for v in verdicts if v.values]
    expected = ["reference run(s)", "span of the reference runs", "measured runs"]
    expected += ["measured mean: reproduced"] * any(v.verdict == REPRODUCED for v in measured)
    expected += ["measured mean: below / above"] * any(v.verdict != REPRODUCED for v in measured)
    assert [t.get_text() for t in left.get_legend().get_texts()] == expected
    assert len(left.texts) == len(specs) - len(measured)
    shown = {label.get_text() for label in left.get_yticklabels() if label.get_color() != NOT_RUN_COLOUR}
    assert shown == {v.row for v in measured} and "sf_seg_v1" in shown
