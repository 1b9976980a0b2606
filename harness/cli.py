"""The `bench` command line: parses arguments and delegates; every BenchError becomes one line."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import click
import yaml

from harness.errors import BenchError


class BenchGroup(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except BenchError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)


@click.group(cls=BenchGroup)
def main() -> None:
    """segbench: reproduce the Cityscapes benchmark table, one row at a time."""


@main.command("list")
def list_rows() -> None:
    """All rows in table order."""
    from tabulate import tabulate

    from harness.spec import load_all
    from harness.table import reference_cell

    rows = [
        (s.row, s.model.family, s.model.backbone, "yes" if s.columns.ema else "no", s.columns.batch_size,
         s.columns.epochs, reference_cell(s).replace("\\|", "|"))
        for s in load_all()
    ]
    click.echo(tabulate(rows, headers=["row", "model", "backbone", "ema", "bs", "epochs", "reference"],
                        disable_numparse=True))


@main.command()
@click.argument("row")
def show(row: str) -> None:
    """The resolved spec of ROW."""
    from harness.spec import load_spec

    click.echo(yaml.safe_dump(load_spec(row).to_dict(), sort_keys=False), nl=False)


@main.command()
@click.option("--row", required=True, help="Row id, e.g. sf_seg_v2-ema (see `bench list`).")
@click.option("--synthetic", is_flag=True, help="Train on the generated synthetic dataset with a CPU-sized budget.")
@click.option("--data-root", type=str, default=None, help="Cityscapes root (default: $CITYSCAPES_DATASET).")
@click.option("--iters", type=int, default=None, help="Override the number of training iterations.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--tracking-uri", default=None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or ./mlflow.db).")
@click.option("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available).")
def run(row: str, synthetic: bool, data_root: Optional[str], iters: Optional[int], seed: int,
        tracking_uri: Optional[str], device: Optional[str]) -> None:
    """Train and evaluate one row; log to MLflow, write a result record, regenerate benchmark.md."""
    from harness.runner import RunOptions, run as run_row

    record = run_row(RunOptions(row=row, synthetic=synthetic, data_root=data_root, iters=iters, seed=seed,
                                tracking_uri=tracking_uri, device=device))
    ema = f", EMA mIoU {record['miou_ema']:.2f}" if record["miou_ema"] is not None else ""
    click.echo(f"{row} on {record['dataset']}: mIoU {record['miou']:.2f}{ema} "
               f"({record['iterations']} iterations, {record['wall_time_s']:.0f} s); record {record['_path']}")


@main.command()
@click.option("--dataset", type=click.Choice(["cityscapes", "synthetic"]), default="cityscapes", show_default=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write here instead (synthetic tables are only printed unless --out is given).")
def table(dataset: str, out: Optional[Path]) -> None:
    """Regenerate benchmark.md from experiments/ and results/ (Cityscapes results only)."""
    from harness.table import render, write_benchmark

    if dataset == "cityscapes" and out is None:
        click.echo(f"wrote {write_benchmark()}")
        return
    text = render(dataset)
    if out is None:
        click.echo(text, nl=False)
    else:
        out.write_text(text)
        click.echo(f"wrote {out}")


@main.group()
def data() -> None:
    """Dataset utilities."""


@data.command("synthetic")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--train-images", type=int, default=24, show_default=True)
@click.option("--val-images", type=int, default=8, show_default=True)
def data_synthetic(out: Path, seed: int, train_images: int, val_images: int) -> None:
    """Write a synthetic dataset in the Cityscapes layout."""
    from harness.data.synthetic import write_synthetic

    if out.exists() and any(out.iterdir()):
        raise BenchError(f"--out {out} exists and is not empty; choose a new folder")
    write_synthetic(out, seed=seed, train_images=train_images, val_images=val_images)
    click.echo(f"wrote {train_images} train and {val_images} val images to {out}")


if __name__ == "__main__":
    main()
