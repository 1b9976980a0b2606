"""`bench list`: every row in table order, then our rows, with the table's columns (and, with sizes, each network's
parameters and GFLOPs at its test size)."""

from __future__ import annotations

from tabulate import tabulate

from harness.config.spec import load_all, load_ours
from harness.report.table import reference_cell


def list_rows(sizes: bool = False) -> str:
    table_specs = load_all()
    specs = table_specs + load_ours()
    rows = [
        [s.row, s.model.family, s.model.backbone, "yes" if s.columns.ema else "no", s.columns.batch_size,
         s.columns.epochs, reference_cell(s).replace("\\|", "|") + ("" if i < len(table_specs) else " (our row)")]
        for i, s in enumerate(specs)
    ]
    headers = ["row", "model", "backbone", "ema", "bs", "epochs", "reference"]
    if sizes:
        from harness.models.sizes import measure_rows

        measured = measure_rows(specs)
        headers += ["test size", "params (M)", "inference params (M)", "GFLOPs"]
        for spec, row in zip(specs, rows):
            size = measured.get(spec.row)
            row.append("x".join(map(str, spec.columns.test_size)))
            row += ([f"{size.params / 1e6:.2f}", f"{size.inference_params / 1e6:.2f}", f"{size.gflops:.1f}"]
                    if size else ["-", "-", "not built"])
    return tabulate(rows, headers=headers, disable_numparse=True)
