"""`bench plan`: what the rows cost before they run: per row and in total, iterations, images, GPU-hours and wall
time on the given GPU count and device, measured by `bench speed`, calibrated from a record of the network family,
or assumed (harness.report.estimates)."""

from __future__ import annotations

from typing import Optional

from tabulate import tabulate

from harness.config.spec import select_rows
from harness.errors import BenchError
from harness.report.estimates import (
    ASSUMED,
    CALIBRATED,
    MEASURED,
    Rates,
    RowCost,
    Target,
    hours,
    resolve_device,
    row_cost,
)


def plan_costs(pattern: str = "*", gpus: int = 8, seeds: int = 1, device: Optional[str] = None
               ) -> tuple[Rates, list[RowCost]]:
    """(the rates of the device, each row's cost) for the rows the globs name."""
    if gpus < 1 or seeds < 1:
        raise BenchError(f"--gpus and --seeds must be at least 1 (got {gpus}, {seeds})")
    specs = select_rows(pattern)
    rates = Rates(resolve_device(device))
    return rates, [row_cost(spec, rates, gpus, seeds) for spec in specs]


def device_hours(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:,.1f}"


def render_plan(rates: Rates, costs: list[RowCost], gpus: int, seeds: int) -> str:
    target: Target = rates.target
    unit = target.unit
    lines = []
    for c in costs:
        total = f"shared ({c.runs_of})" if c.shared else device_hours(c.total_gpu_hours)
        lines.append([c.row, f"{c.iterations:,}", f"{c.images:,}", f"{c.eval_images:,}", device_hours(c.gpu_hours),
                      hours(c.wall_hours), total, c.label])
    text = tabulate(lines, headers=["row", "iterations", "train images", "val images", f"{unit}-h / run",
                                    f"wall / run on {gpus} {unit}(s)", f"{unit}-h x {seeds} seed(s)", "figures"],
                    disable_numparse=True, colalign=("left", "right", "right", "right", "right", "right", "right"))
    # Each training row once: a light-seg row shares its base row's runs (counted once, selected or not).
    trained: dict[str, RowCost] = {}
    for c in costs:
        trained.setdefault(c.runs_of, c)
    known = [c for c in trained.values() if c.gpu_hours is not None]
    unknown = [c.runs_of for c in trained.values() if c.gpu_hours is None]
    total_hours = sum(c.gpu_hours for c in known if c.gpu_hours is not None) * seeds
    counts = ", ".join(f"{sum(1 for c in known if c.basis == basis)} {basis}" for basis in (MEASURED, CALIBRATED,
                                                                                              ASSUMED))
    summary = (f"total: {len(trained)} training row(s) x {seeds} seed(s) = {len(trained) * seeds} run(s), "
               f"{total_hours:,.1f} {unit}-hours on {target.shown}, {hours(total_hours / gpus)} of wall time one run "
               f"after another on {gpus} {unit}(s) (row(s): {counts}")
    summary += f", {len(unknown)} unknown: {', '.join(unknown)})" if unknown else ")"
    device = f"device: {target.shown}, {target.why}"
    peak = rates.peak()
    if peak is not None:
        device += f"; peak: {peak.shown}"
    notes = (f"{unit}-hours are the single-device rate's; wall time assumes the rate scales with the {unit} count. "
             "Calibrated and assumed rows are the row's FLOPs at the peak times a model FLOP utilisation (MFU): one a "
             "`bench speed` record of the network family reached, or the assumed one; `bench speed --rows all` on "
             "the device replaces them with measurements.")
    return "\n".join([text, summary, device, notes])


def plan(pattern: str = "*", gpus: int = 8, seeds: int = 1, device: Optional[str] = None) -> str:
    rates, costs = plan_costs(pattern, gpus, seeds, device)
    return render_plan(rates, costs, gpus, seeds)
