"""`bench plan`: what the rows cost before they run: per row and in total, iterations, images, GPU-hours and wall
time on the given GPU count, from `bench speed` records of the device or estimated (harness.report.estimates)."""

from __future__ import annotations

from typing import Optional

from tabulate import tabulate

from harness.config.spec import select_rows
from harness.errors import BenchError
from harness.report.estimates import ESTIMATE, Rates, RowCost, choose_device, hours, row_cost


def plan_costs(pattern: str = "*", gpus: int = 8, seeds: int = 1, device: Optional[str] = None
               ) -> tuple[str, list[RowCost]]:
    """(the device, each row's cost) for the rows the globs name."""
    if gpus < 1 or seeds < 1:
        raise BenchError(f"--gpus and --seeds must be at least 1 (got {gpus}, {seeds})")
    specs = select_rows(pattern)
    rates = Rates(choose_device(device))
    return rates.device, [row_cost(spec, rates, gpus, seeds) for spec in specs]


def gpu_hours(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:,.1f}"


def render_plan(device: str, costs: list[RowCost], gpus: int, seeds: int) -> str:
    lines = []
    for c in costs:
        total = f"shared ({c.runs_of})" if c.shared else gpu_hours(c.total_gpu_hours)
        lines.append([c.row, f"{c.iterations:,}", f"{c.images:,}", f"{c.eval_images:,}", gpu_hours(c.gpu_hours),
                      hours(c.wall_hours), total, c.label])
    text = tabulate(lines, headers=["row", "iterations", "train images", "val images", "GPU-h / run",
                                    f"wall / run on {gpus} GPU(s)", f"GPU-h x {seeds} seed(s)", "figures"],
                    disable_numparse=True, colalign=("left", "right", "right", "right", "right", "right", "right"))
    # Each training row once: a light-seg row shares its base row's runs (counted once, selected or not).
    trained: dict[str, RowCost] = {}
    for c in costs:
        trained.setdefault(c.runs_of, c)
    known = [c for c in trained.values() if c.gpu_hours is not None]
    unknown = [c.runs_of for c in trained.values() if c.gpu_hours is None]
    total_hours = sum(c.gpu_hours for c in known if c.gpu_hours is not None) * seeds
    estimated = sum(1 for c in trained.values() if c.gpu_hours is not None and ESTIMATE in c.label)
    summary = (f"total: {len(trained)} training row(s) x {seeds} seed(s) = {len(trained) * seeds} run(s), "
               f"{total_hours:,.1f} GPU-hours on {device}, {hours(total_hours / gpus)} of wall time one run after "
               f"another on {gpus} GPU(s) ({len(known) - estimated} row(s) measured, {estimated} estimated")
    summary += f", {len(unknown)} unknown: {', '.join(unknown)})" if unknown else ")"
    notes = ("GPU-hours are the single-device rate's; wall time assumes the rate scales with the GPU count. "
             "Estimates are FLOPs at an assumed share of the device's matmul peak; `bench speed --rows all` on the "
             "device replaces them with measurements.")
    return "\n".join([text, summary, notes])


def plan(pattern: str = "*", gpus: int = 8, seeds: int = 1, device: Optional[str] = None) -> str:
    found, costs = plan_costs(pattern, gpus, seeds, device)
    return render_plan(found, costs, gpus, seeds)
