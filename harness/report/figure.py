"""benchmark.png: measured vs reference per row with the spread, and mIoU against GFLOPs.

Drawn with matplotlib's Agg canvas (no pyplot, no display) in matplotlib's default style, saved without the
software/date metadata, so the same inputs give the same bytes. GFLOPs come from harness.models.sizes (meta
device) and are cached on disk under the cache folder, keyed by the network's spec, its test size, torch's
version and the model code, because every `bench run` regenerates the figure.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import re
from pathlib import Path
from typing import Optional

from harness import paths
from harness.config.spec import Spec
from harness.files import atomic_write_text, write_if_changed
from harness.report.verdicts import REPRODUCED, RowVerdict

SIZES_CACHE = "model-sizes.json"
REPRODUCED_COLOUR, OUTSIDE_COLOUR = "tab:green", "tab:red"


def _model_key(spec: Spec, code_digest: str, torch_version: str) -> str:
    model = dataclasses.replace(spec.model, backbone_checkpoint=None, init_checkpoint=None)
    payload = json.dumps([dataclasses.asdict(model), spec.columns.test_size, torch_version, code_digest],
                         sort_keys=True)
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


def _network_label(row: str) -> str:
    return re.sub(r"-(ema|mseg|lightseg)$", "", row)


def figure_png(specs: list[Spec], verdicts: list[RowVerdict], gflops: dict[str, float]) -> bytes:
    """The PNG bytes of the two panels, rows in table order."""
    import matplotlib.style
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    with matplotlib.style.context("default"):
        fig = Figure(figsize=(15, 0.3 * len(specs) + 2.0), dpi=100, layout="constrained")
        FigureCanvasAgg(fig)
        left, right = fig.subplots(1, 2, width_ratios=[1.1, 1])

        ys = list(range(len(specs)))[::-1]  # first row at the top, as in benchmark.md
        for y, v in zip(ys, verdicts):
            left.plot([min(v.reference), max(v.reference)], [y, y], color="0.7", lw=7, solid_capstyle="butt")
            left.plot(v.reference, [y] * len(v.reference), "kx", ms=6)
            if v.values:
                colour = REPRODUCED_COLOUR if v.verdict == REPRODUCED else OUTSIDE_COLOUR
                left.plot(v.values, [y - 0.2] * len(v.values), ".", color=colour, ms=4, alpha=0.6)
                left.errorbar([v.mean], [y], xerr=[[v.std or 0.0], [v.std or 0.0]], fmt="o", color=colour,
                              ms=6, capsize=3)
        left.set_yticks(ys, [s.row for s in specs], fontsize=8)
        left.set_ylim(-1, len(specs))
        left.set_xlabel("mIoU (%)")
        left.set_title("measured mean ± std (dots: runs) vs reference (x, grey: its runs' span)", fontsize=10)
        left.grid(axis="x", alpha=0.3)
        left.legend(handles=[
            Line2D([], [], marker="x", ls="none", color="k", label="reference run(s)"),
            Line2D([], [], marker="o", ls="none", color=REPRODUCED_COLOUR, label="measured: reproduced"),
            Line2D([], [], marker="o", ls="none", color=OUTSIDE_COLOUR, label="measured: below / above"),
        ], loc="lower left", fontsize=8)

        groups: dict[float, list[str]] = {}
        for spec, v in zip(specs, verdicts):
            g = gflops.get(spec.row)
            if g is None:
                continue
            groups.setdefault(round(g, 1), []).append(spec.row)
            ref = sum(v.reference) / len(v.reference)
            right.plot([g], [ref], "o", mfc="none", mec="0.4", ms=7)
            if v.values:
                colour = REPRODUCED_COLOUR if v.verdict == REPRODUCED else OUTSIDE_COLOUR
                right.errorbar([g], [v.mean], yerr=[[v.std or 0.0], [v.std or 0.0]], fmt="o", color=colour,
                               ms=6, capsize=3)
        for i, (g, rows) in enumerate(sorted(groups.items())):
            refs = [x for s, v in zip(specs, verdicts) if s.row in rows for x in v.reference]
            label = " / ".join(dict.fromkeys(_network_label(r) for r in rows))
            # neighbours on the log axis alternate above and below their points so the labels stay apart
            above = i % 2 == 0
            right.annotate(label, (g, max(refs) if above else min(refs)), textcoords="offset points",
                           xytext=(4, 6 if above else -14), fontsize=8)
        right.set_xscale("log")
        right.set_xlabel("GFLOPs at the row's test size (one forward, multiply-add = 2)")
        right.set_ylabel("mIoU (%)")
        right.set_title("mIoU against GFLOPs: reference (hollow) and measured mean ± std", fontsize=10)
        right.grid(alpha=0.3, which="both")

        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


def write_figure(path: Path, specs: list[Spec], verdicts: list[RowVerdict]) -> Path:
    """Write the figure to `path` when its bytes changed (atomic replace)."""
    write_if_changed(path, figure_png(specs, verdicts, gflops_by_row(specs)))
    return path
