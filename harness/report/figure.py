"""benchmark.png: measured vs reference per row with the spread, and mIoU against GFLOPs.

Drawn with matplotlib's Agg canvas (no pyplot, no display) in matplotlib's default style, saved without the
software/date metadata, so the same inputs give the same bytes. GFLOPs come from harness.models.sizes (meta
device) and are cached on disk under the cache folder, keyed by the network's spec, its test size, torch's
version and the model code, because every `bench run` regenerates the figure.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Optional

from harness import paths
from harness.config.spec import Spec
from harness.config.up_configs import up_base_row
from harness.files import atomic_write_text, write_if_changed
from harness.report.verdicts import REPRODUCED, RowVerdict

SIZES_CACHE = "model-sizes.json"
REPRODUCED_COLOUR, OUTSIDE_COLOUR = "tab:green", "tab:red"


def _model_key(spec: Spec, code_digest: str, torch_version: str) -> str:
    payload = json.dumps([spec.network_key, spec.columns.test_size, torch_version, code_digest], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def gflops_by_row(specs: list[Spec], cache: Optional[Path] = None) -> dict[str, float]:
    """GFLOPs of each built row's network at its test size; measured once per network, then read from the cache."""
    from importlib.metadata import version

    cache = cache or paths.cache_dir() / SIZES_CACHE
    model_code = sorted((paths.PROJECT_ROOT / "harness" / "models").glob("*.py"))
    code = hashlib.sha256(b"".join(p.read_bytes() for p in model_code))
    keys = {s.row: _model_key(s, code.hexdigest(), version("torch")) for s in specs}
    try:
        stored: dict[str, float] = json.loads(cache.read_text())
    except (OSError, json.JSONDecodeError):
        stored = {}
    missing = [s for s in specs if keys[s.row] not in stored]
    if missing:
        from harness.models.sizes import measure_rows  # builds every family: only on a cache miss

        for row, size in measure_rows(missing).items():
            stored[keys[row]] = size.gflops
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(cache, json.dumps(stored, indent=1, sort_keys=True))
        except OSError:
            pass  # a read-only cache only costs the measurement next time
    return {row: stored[key] for row, key in keys.items() if key in stored}


NOT_RUN_COLOUR = "0.55"


def _overlaps(box, boxes) -> bool:
    return any(box.x0 < b.x1 and b.x0 < box.x1 and box.y0 < b.y1 and b.y0 < box.y1 for b in boxes)


def _label_networks(fig, axes, networks: dict[str, tuple[float, list[float]]]) -> None:
    """One label per network, right of its highest point (left of it where the frame ends), moved up or down (with a
    thin line back to the point) until it overlaps no other label and no point. The layout is fixed first, so that
    measured positions stay true."""
    from matplotlib.transforms import Bbox

    fig.draw_without_rendering()
    fig.set_layout_engine("none")
    renderer = fig.canvas.get_renderer()
    frame = axes.get_window_extent(renderer)
    radius = 5.0  # pixels around a marker's centre that a label keeps clear of
    placed: list[Bbox] = []
    for g, values in networks.values():
        for value in values:
            x, y = axes.transData.transform((g, value))
            placed.append(Bbox.from_extents(x - radius, y - radius, x + radius, y + radius))
    for name, (g, values) in sorted(networks.items(), key=lambda item: (item[1][0], -max(item[1][1]))):
        top = max(values)
        text = axes.annotate(name, (g, top), xytext=(7, 0), textcoords="offset points", va="center", fontsize=8,
                             annotation_clip=False)
        if text.get_window_extent(renderer).x1 > frame.x1:  # no room on the right: the label goes left
            text.set_horizontalalignment("right")
        side = 7 if text.get_horizontalalignment() == "left" else -7
        height = text.get_window_extent(renderer).height
        for step in range(80):  # 0, +1, -1, +2, -2, ... label heights away from the point
            shift = (step + 1) // 2 * (1 if step % 2 else -1) * height * 1.15
            text.set_position((side, shift * 72 / fig.dpi))
            box = text.get_window_extent(renderer)
            if not _overlaps(box, placed) and frame.y0 <= box.y0 and box.y1 <= frame.y1:
                break
        if step:  # moved away from its point: joined to it by a thin line
            offset, align = text.get_position(), text.get_horizontalalignment()
            text.remove()
            axes.annotate(name, (g, top), xytext=offset, textcoords="offset points", va="center", ha=align,
                          fontsize=8, annotation_clip=False,
                          arrowprops={"arrowstyle": "-", "color": "0.6", "lw": 0.6, "shrinkA": 0, "shrinkB": 4})
        placed.append(box.padded(1))


def build_figure(specs: list[Spec], verdicts: list[RowVerdict], gflops: dict[str, float]):
    """The figure of the two panels, rows in table order (a matplotlib Figure on an Agg canvas)."""
    import matplotlib.style
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    with matplotlib.style.context("default"):
        fig = Figure(figsize=(15, 0.3 * len(specs) + 2.0), dpi=100, layout="constrained")
        FigureCanvasAgg(fig)
        left, right = fig.subplots(1, 2, width_ratios=[1.1, 1])

        ys = list(range(len(specs)))[::-1]  # first row at the top, as in benchmark.md
        shown: set[str] = set()
        right_edge = max((x for v in verdicts for x in [*v.reference, *v.values]), default=100.0) + 0.5
        for y, v in zip(ys, verdicts):
            if len(v.reference) > 1:
                left.plot([min(v.reference), max(v.reference)], [y, y], color="0.7", lw=7, solid_capstyle="butt")
                shown.add("span")
            left.plot(v.reference, [y] * len(v.reference), "kx", ms=6)
            shown.add("reference")
            if v.values:
                outside = v.verdict != REPRODUCED
                colour = OUTSIDE_COLOUR if outside else REPRODUCED_COLOUR
                left.plot(v.values, [y - 0.2] * len(v.values), ".", color=colour, ms=4, alpha=0.6)
                left.errorbar([v.mean], [y], xerr=[[v.std or 0.0], [v.std or 0.0]], fmt="o", color=colour,
                              ms=6, capsize=3)
                shown.update({"runs", "outside" if outside else "reproduced"})
            else:  # said in words at the row, so that an empty row cannot pass for a measured one
                left.annotate(v.verdict, (right_edge, y), xytext=(4, 0), textcoords="offset points", va="center",
                              fontsize=7, color=NOT_RUN_COLOUR, style="italic")
        left.set_yticks(ys, [s.row for s in specs], fontsize=8)
        for label, v in zip(left.get_yticklabels()[::-1][::-1], verdicts):
            if not v.values:
                label.set_color(NOT_RUN_COLOUR)
        left.set_ylim(-1, len(specs))
        low, high = left.get_xlim()
        left.set_xlim(low, max(high, right_edge + 0.09 * (right_edge - low)))  # room for the words at the right
        left.set_xlabel("mIoU (%)")
        not_run = sum(1 for v in verdicts if not v.values)
        left.set_title(f"measured mean ± std vs reference; {not_run} of {len(verdicts)} rows without a counted run "
                       "(grey)", fontsize=10)
        left.grid(axis="x", alpha=0.3)
        handles = {
            "reference": Line2D([], [], marker="x", ls="none", color="k", label="reference run(s)"),
            "span": Line2D([], [], color="0.7", lw=7, label="span of the reference runs"),
            "runs": Line2D([], [], marker=".", ls="none", color="0.3", label="measured runs"),
            "reproduced": Line2D([], [], marker="o", ls="none", color=REPRODUCED_COLOUR,
                                 label="measured mean: reproduced"),
            "outside": Line2D([], [], marker="o", ls="none", color=OUTSIDE_COLOUR,
                              label="measured mean: below / above"),
        }
        if shown:
            left.legend(handles=[h for key, h in handles.items() if key in shown], loc="best", fontsize=8)

        # One label per network (a row and its -ema / -lightseg variants share it), in a column right of the points,
        # spread apart and joined to its highest point by a thin line.
        networks: dict[str, tuple[float, list[float]]] = {}
        measured_any = False
        for spec, v in zip(specs, verdicts):
            g = gflops.get(spec.row)
            if g is None:
                continue
            ref = sum(v.reference) / len(v.reference)
            right.plot([g], [ref], "o", mfc="none", mec="0.4", ms=7)
            name = up_base_row(spec.row)
            point = networks.setdefault(name, (g, []))
            point[1].append(ref)
            if v.values:
                measured_any = True
                colour = REPRODUCED_COLOUR if v.verdict == REPRODUCED else OUTSIDE_COLOUR
                right.errorbar([g], [v.mean], yerr=[[v.std or 0.0], [v.std or 0.0]], fmt="o", color=colour,
                               ms=6, capsize=3)
                point[1].append(v.mean if v.mean is not None else ref)
        right.set_xscale("log")
        right.set_xlabel("GFLOPs at the row's test size (one forward, multiply-add = 2)")
        right.set_ylabel("mIoU (%)")
        what = ("reference (hollow) and measured mean ± std" if measured_any else
                "reference (hollow); nothing measured yet")
        right.set_title(f"mIoU against GFLOPs: {what}", fontsize=10)
        right.grid(alpha=0.3, which="both")
        if networks:
            low, high = right.get_xlim()
            right.set_xlim(low, high * 1.6)  # room for the labels of the right-most networks (a log axis)
            _label_networks(fig, right, networks)
    return fig


def figure_png(specs: list[Spec], verdicts: list[RowVerdict], gflops: dict[str, float]) -> bytes:
    """The PNG bytes of the two panels."""
    import matplotlib.style

    with matplotlib.style.context("default"):
        buffer = io.BytesIO()
        build_figure(specs, verdicts, gflops).savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


def write_figure(path: Path, specs: list[Spec], verdicts: list[RowVerdict]) -> Path:
    """Write the figure to `path` when its bytes changed (atomic replace)."""
    write_if_changed(path, figure_png(specs, verdicts, gflops_by_row(specs)))
    return path
