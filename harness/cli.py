"""The `bench` command line: parses arguments and delegates; every BenchError becomes one line."""

from __future__ import annotations

import fnmatch
import os
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
            from harness.distributed import record_worker_error

            if not record_worker_error(str(exc)):  # a torchrun worker's error is reported once, by the launcher
                click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)


@click.group(cls=BenchGroup)
def main() -> None:
    """segbench: reproduce the Cityscapes benchmark table, one row at a time."""


# Options several commands share, declared once.
DATA_OPTIONS = (
    click.option("--synthetic", is_flag=True, help="Use the generated synthetic dataset (and its CPU-sized budget)."),
    click.option("--data-root", type=str, default=None, help="Cityscapes root (default: $CITYSCAPES_DATASET)."),
)
DEVICE_OPTIONS = (
    click.option("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)."),
    click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default=None,
                 help="Autocast precision (default: bf16 on GPU, fp32 on CPU)."),
)
TRACKING_OPTIONS = (
    click.option("--tracking-uri", default=None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or ./mlflow.db)."),
    click.option("--offline-tracking", is_flag=True,
                 help="Do not contact MLflow: log into the run folder only; `bench sync` sends it later."),
)


def with_options(*groups):
    """Apply option groups to a command, in the order listed."""
    def decorate(command):
        for option in reversed([option for group in groups for option in group]):
            command = option(command)
        return command
    return decorate


@main.command("list")
@click.option("--sizes", is_flag=True,
              help="Add each row's parameter count and GFLOPs at its test size, measured with "
                   "torch.utils.flop_counter (a multiply-add counts as 2 FLOPs).")
def list_rows(sizes: bool) -> None:
    """All rows in table order, then our rows (spec files `_table.yaml` does not list)."""
    from tabulate import tabulate

    from harness.spec import load_all, load_ours
    from harness.table import reference_cell

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
    click.echo(tabulate(rows, headers=headers, disable_numparse=True))


@main.command("new-row")
@click.argument("name")
@click.option("--arch", required=True, help="A segmentation-models-pytorch architecture, e.g. Unet, FPN, DeepLabV3Plus.")
@click.option("--encoder", required=True, help="An smp encoder (e.g. resnet50) or 'tu-' + a timm model name.")
@click.option("--from", "source", default="deeplabv3-r50", show_default=True, help="The row whose recipe it inherits.")
def new_row_command(name: str, arch: str, encoder: str, source: str) -> None:
    """Write experiments/NAME.yaml: one of our rows, ARCH on ENCODER with a table row's recipe."""
    from harness.new_row import new_row

    path = new_row(name, arch, encoder, source)
    click.echo(f"wrote {path}; try it with: bench run --row {name} --synthetic")


@main.command()
@click.argument("row")
def show(row: str) -> None:
    """The resolved spec of ROW."""
    from harness.spec import load_spec

    click.echo(yaml.safe_dump(load_spec(row).to_dict(), sort_keys=False), nl=False)


@main.command()
@click.option("--row", required=True, help="Row id, e.g. sf_seg_v2-ema (see `bench list`).")
@with_options(DATA_OPTIONS, DEVICE_OPTIONS, TRACKING_OPTIONS)
@click.option("--iters", type=int, default=None, help="Override the number of training iterations.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--seeds", "seeds_text", default=None, metavar="LIST",
              help="Several seeds run one after another, each its own run and record (e.g. 0,1,2).")
@click.option("--gpus", type=int, default=1, show_default=True,
              help="Processes per node, one per GPU, launched with torchrun; the global batch stays the spec's.")
@click.option("--nnodes", type=int, default=1, show_default=True, help="Nodes in a multi-node run (torchrun).")
@click.option("--node-rank", type=int, default=0, show_default=True, help="This node's rank (torchrun).")
@click.option("--master-addr", default=None, help="Rendezvous host of a multi-node run (torchrun).")
@click.option("--master-port", type=int, default=None, help="Rendezvous port of a multi-node run (torchrun).")
@click.option("--resume", is_flag=False, flag_value="latest", default=None,
              help="Continue the last unfinished run of this row, or the run folder / checkpoint given.")
@click.option("--deterministic", is_flag=True, help="PyTorch deterministic algorithms (slower).")
@click.option("--init-checkpoint", type=click.Path(dir_okay=False), default=None,
              help="Start from this whole-model checkpoint (overrides model.init_checkpoint).")
@click.option("--compile", "compile_model", is_flag=True, help="Run the model through torch.compile.")
@click.option("--eval-every", type=int, default=None,
              help="Evaluate every N iterations and keep the best (default: the recipe's, every 5 epochs).")
@click.option("--decoded-cache", type=click.Path(file_okay=False), default=None, metavar="DIR",
              help="Read decoded frames from this folder (built on first use, ~8 MiB a frame) instead of decoding "
                   "PNGs every epoch: for rows that train faster than the cores can decode.")
def run(row: str, synthetic: bool, data_root: Optional[str], iters: Optional[int], seed: int,
        tracking_uri: Optional[str], device: Optional[str], gpus: int, nnodes: int, node_rank: int,
        master_addr: Optional[str], master_port: Optional[int], precision: Optional[str], resume: Optional[str],
        deterministic: bool, init_checkpoint: Optional[str], eval_every: Optional[int], compile_model: bool,
        offline_tracking: bool, decoded_cache: Optional[str] = None, seeds_text: Optional[str] = None) -> None:
    """Train and evaluate one row; log to MLflow, write a result record, regenerate benchmark.md."""
    from dataclasses import replace

    from harness.runner import RunOptions, exit_code_for, launch, run as run_row
    from harness.train import Interrupted
    from harness.verdicts import parse_seeds, training_row

    row, note = training_row(row)
    if note:
        click.echo(note, err=True)
    seeds = [seed]
    if seeds_text is not None:
        if seed != 0 or resume:
            raise BenchError("--seeds starts one new run per seed: drop --seed and --resume (or run one --seed)")
        seeds = parse_seeds(seeds_text)
        seed = seeds[0]

    options = RunOptions(row=row, synthetic=synthetic, data_root=data_root, iters=iters, seed=seed,
                         tracking_uri=tracking_uri, device=device, precision=precision, resume=resume,
                         deterministic=deterministic, init_checkpoint=init_checkpoint, eval_every=eval_every,
                         compile=compile_model, offline_tracking=offline_tracking, decoded_cache=decoded_cache)
    exit_code = launch(options, seeds, gpus, nnodes, node_rank, master_addr, master_port)
    if exit_code is not None:
        sys.exit(exit_code)
    for index, run_seed in enumerate(seeds):
        try:
            record = run_row(replace(options, seed=run_seed))
        except Interrupted as stop:
            if os.environ.get("RANK", "0") == "0":  # every rank stopped at the same iteration; one says so
                where = f"; checkpoint {stop.path}" if stop.path else ""
                click.echo(f"{stop}{where}; continue with: bench run --row {row} --resume", err=True)
                if seeds[index + 1:]:
                    click.echo(f"seeds not started: {','.join(map(str, seeds[index + 1:]))}", err=True)
            sys.exit(exit_code_for(stop))
        if not record:
            continue  # a non-zero rank of a distributed run
        ema = (f", EMA {record['miou_ema']:.2f} (best {record['miou_ema_best']:.2f} at {record['best_iteration_ema']})"
               if record["miou_ema"] is not None else "")
        click.echo(f"{row} seed {run_seed} on {record['dataset']}: mIoU {record['miou']:.2f} (best "
                   f"{record['miou_best']:.2f} at {record['best_iteration']}){ema}; {record['iterations']} iterations, "
                   f"{record['wall_time_s']:.0f} s; record {record['_path']}")
        if record["dataset"] != "synthetic" and record["starting_weights"].startswith("missing"):
            click.echo(f"warning: started from random weights ({record['starting_weights']}); see `bench weights`", err=True)


@main.command()
@click.option("--rows", "pattern", default="*", show_default=True, help="Rows to list (a glob).")
def weights(pattern: str) -> None:
    """The starting-weight files each row expects, where, and whether they are present."""
    from tabulate import tabulate

    from harness.models.weights import expected_files
    from harness.spec import load_all

    lines = []
    for spec in load_all():
        if not fnmatch.fnmatch(spec.row, pattern):
            continue
        files = expected_files(spec)
        if not files:
            lines.append([spec.row, "-", "(none: random initialisation, as the table's run)", "-"])
        for key, path in files:
            lines.append([spec.row, key, str(path), "present" if path.is_file() else "MISSING"])
    click.echo(tabulate(lines, headers=["row", "spec key", "file", "status"], disable_numparse=True))
    missing = sum(1 for line in lines if line[3] == "MISSING")
    if missing:
        click.echo(f"{missing} file(s) missing: bring them (nothing is downloaded); relative paths are read from "
                   f"the project root, or from $SEGBENCH_WEIGHTS for weights/...", err=True)


@main.command()
@click.option("--dataset", type=click.Choice(["cityscapes", "synthetic"]), default="cityscapes", show_default=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write here instead (synthetic tables are only printed unless --out is given).")
@click.option("--all", "all_records", is_flag=True,
              help="Print the table with every record of the dataset and its kind (reproduction, smoke, ...).")
def table(dataset: str, out: Optional[Path], all_records: bool) -> None:
    """Regenerate benchmark.md and benchmark.png from experiments/ and results/ (Cityscapes reproductions only)."""
    from harness.table import render, write_benchmark

    if dataset == "cityscapes" and out is None and not all_records:
        click.echo(f"wrote {write_benchmark()}")
        return
    text = render(dataset, all_records=all_records)
    if out is None:
        click.echo(text, nl=False)
    else:
        out.write_text(text)
        click.echo(f"wrote {out}")


@main.command()
@click.option("--rows", "pattern", default="*", show_default=True, help="Rows to check (a glob).")
@click.option("--tolerance", type=float, default=0.5, show_default=True,
              help="mIoU points the mean may differ from the reference mean (or lie within the reference's span).")
@click.option("--json", "as_json", is_flag=True, help="Print the verdicts as JSON.")
def check(pattern: str, tolerance: float, as_json: bool) -> None:
    """Each row's verdict from the Cityscapes reproductions; exit 1 if a row with results is outside the tolerance."""
    from harness.verdicts import check_report, check_rows

    verdicts = check_rows(pattern, tolerance)
    click.echo(check_report(verdicts, as_json))
    if any(v.outside for v in verdicts):
        sys.exit(1)


def checkpoint_options(command):
    """Options `bench eval` and `bench predict` share."""
    for option in reversed([
        click.option("--row", default=None, help="Row id whose model and test settings to use (default: the checkpoint's row)."),
        click.option("--checkpoint", required=True, type=click.Path(dir_okay=False),
                     help="A segbench checkpoint (runs/<dataset>/<row>/<stamp>/checkpoints/ckpt-*.pt)."),
        click.option("--weights", type=click.Choice(["ema", "raw"]), default=None,
                     help="Which weights of the checkpoint (default: ema for EMA rows, raw otherwise)."),
        *DATA_OPTIONS, *DEVICE_OPTIONS,
    ]):
        command = option(command)
    return command


@main.command("eval")
@checkpoint_options
@click.option("--split", default="val", show_default=True, help="A labelled split.")
@click.option("--save-predictions", type=click.Path(file_okay=False), default=None,
              help="Also write labelId PNGs here, as the official evaluator reads them.")
@click.option("--panels", type=int, default=4, show_default=True, help="Image/truth/prediction panels to log.")
@with_options(TRACKING_OPTIONS)
def eval_command(panels: int, **options) -> None:
    """Evaluate a checkpoint; log to MLflow and write a result record."""
    from harness.checkpoint_eval import EvalOptions, evaluate_checkpoint

    record = evaluate_checkpoint(EvalOptions(num_panels=panels, **options))
    click.echo(f"{record['row']} {record['weights']} weights on {record['dataset']} {record['split']}: "
               f"mIoU {record['miou']:.2f} ({record['test_mode']}); record {record['_path']}")


@main.command("predict")
@checkpoint_options
@click.option("--split", default="test", show_default=True)
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the labelId PNGs (<city>/<image name>).")
@click.option("--zip", "zip_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The test-server zip (default: <out>.zip).")
def predict_command(out: Path, zip_path: Optional[Path], **options) -> None:
    """Write labelId predictions for a split and pack them into the Cityscapes test-server zip."""
    from harness.checkpoint_eval import EvalOptions, predict_to_zip

    written, packed = predict_to_zip(EvalOptions(**options), out, zip_path or out.with_suffix(".zip"))
    click.echo(f"wrote {len(written)} predictions to {out}; packed {packed}")


@main.command()
@click.option("--dataset", type=click.Choice(["cityscapes", "synthetic"]), default="cityscapes", show_default=True)
@click.option("--tracking-uri", default=None, help="MLflow store (default: $MLFLOW_TRACKING_URI or ./mlflow.db).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on (loopback unless told).")
@click.option("--port", type=int, default=5000, show_default=True)
def ui(dataset: str, tracking_uri: Optional[str], host: str, port: int) -> None:
    """Serve the MLflow UI on the project's store and print the URL of the training runs table."""
    from harness.tracking import serve_ui

    serve_ui(dataset, tracking_uri, host, port)


@main.command()
@click.argument("run_dirs", nargs=-1, type=click.Path(file_okay=False, path_type=Path))
@click.option("--tracking-uri", default=None, help="Send to this store instead of the one each run used.")
def sync(run_dirs: tuple[Path, ...], tracking_uri: Optional[str]) -> None:
    """Send what runs logged locally (offline, or while MLflow was unreachable) to MLflow; default: every run."""
    from harness.finish import sync_runs

    for line in sync_runs(list(run_dirs), tracking_uri):
        click.echo(line)


@main.command()
@click.option("--row", required=True, help="Row id (see `bench list`).")
@click.option("--mode", type=click.Choice(["train", "infer", "eval", "data", "all"]), default="all", show_default=True)
@click.option("--batch", type=int, default=None, help="Images per step (default: the row's batch; 1 for infer).")
@with_options(DEVICE_OPTIONS)
@click.option("--compile", "compile_model", is_flag=True, help="Run the model through torch.compile.")
@click.option("--size", default=None, metavar="W,H",
              help="Image size for every mode (default: crop, test size and 2048x1024 frames; small ones on CPU).")
@click.option("--data-root", default=None, help="Time the loader on this Cityscapes root instead of generated frames.")
@click.option("--workers", type=int, default=None,
              help="Loader workers in data and eval modes (default: the spec's, i.e. this machine's cores).")
@click.option("--warmup", type=int, default=None, help="Untimed steps first (default: 10 on GPU, 1 on CPU).")
@click.option("--repeats", type=int, default=None, help="Timed runs; the median is reported (default: 5 / 3).")
@click.option("--steps", type=int, default=None, help="Steps per timed run (default: 10 / 1).")
def speed(row: str, mode: str, batch: Optional[int], precision: Optional[str], compile_model: bool,
          device: Optional[str], size: Optional[str], data_root: Optional[str], workers: Optional[int],
          warmup: Optional[int], repeats: Optional[int], steps: Optional[int]) -> None:
    """Time a row's training step, inference, evaluation loop and data loading; write a record, print a table."""
    from harness.speed import SpeedOptions, parse_size, render, speed as measure_speed

    record = measure_speed(SpeedOptions(row=row, mode=mode, batch=batch, precision=precision, compile=compile_model,
                                        device=device, size=parse_size(size), data_root=data_root, workers=workers,
                                        warmup=warmup, repeats=repeats, steps=steps))
    click.echo(render(record))


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


@data.command("cache")
@click.option("--data-root", default=None, help="Cityscapes root (default: $CITYSCAPES_DATASET).")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the decoded frames (about 23 GiB for train, 4 GiB for val).")
@click.option("--splits", default="train,val", show_default=True, help="Comma-separated labelled splits.")
def data_cache(data_root: Optional[str], out: Path, splits: str) -> None:
    """Decode a Cityscapes tree once into memory-mapped files for `bench run --decoded-cache`."""
    from harness.data.cityscapes import find_samples
    from harness.data.decoded import cached_or_built

    root = data_root or os.environ.get("CITYSCAPES_DATASET")
    if not root:
        raise BenchError("no dataset given: pass --data-root DIR (or set CITYSCAPES_DATASET)")
    for split in [s.strip() for s in splits.split(",") if s.strip()]:
        cached_or_built(out, Path(root).expanduser(), split, find_samples(Path(root).expanduser(), split),
                        echo=click.echo)


@data.command("check")
@click.option("--data-root", default=None, help="Cityscapes root (default: $CITYSCAPES_DATASET).")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Processes decoding labels (default: the CPU count).")
@click.option("--subset", is_flag=True,
              help="A subset or another frame size (e.g. the synthetic dataset): skip the official counts and 2048x1024.")
def data_check(data_root: Optional[str], workers: Optional[int], subset: bool) -> None:
    """Validate a whole Cityscapes tree before an expensive run; exits 1 on any defect."""
    from harness.data.check import check_tree, format_report

    report = check_tree(data_root, workers=workers, official=not subset)
    click.echo(format_report(report))
    if not report.ok:
        sys.exit(1)



@main.group("sweep", invoke_without_command=True)
@click.option("--rows", "rows", default=None, metavar="GLOB[,GLOB]", help="Rows to run (globs; see `bench list`).")
@click.option("--seeds", "seeds_text", default="0", show_default=True, metavar="LIST", help="Seeds per row, e.g. 0,1,2.")
@click.option("--executor", type=click.Choice(["slurm", "local"]), default="slurm", show_default=True,
              help="Slurm through submitit, or submitit's local executor (this machine).")
@click.option("--gpus-per-node", type=int, default=None, help="GPUs (torchrun processes) per node (default: 8 on Slurm, 1 locally).")
@click.option("--nodes", type=int, default=1, show_default=True, help="Nodes per job.")
@click.option("--partition", default=None, help="Slurm partition.")
@click.option("--time", "time_limit", default=None, metavar="HH:MM:SS", help="Time limit per job; jobs requeue past it.")
@click.option("--account", default=None, help="Slurm account.")
@click.option("--qos", default=None, help="Slurm QOS.")
@click.option("--slurm-arg", "slurm_args", multiple=True, metavar="KEY=VALUE", help="Extra sbatch flag (repeatable).")
@click.option("--max-requeues", type=int, default=None, help="Requeues per job before it is marked failed (default 20).")
@click.option("--dry-run", is_flag=True, help="Print the jobs and the sbatch script; submit nothing.")
@click.option("--wait/--no-wait", default=None, help="Wait for the jobs (default: locally yes, on Slurm no).")
@with_options(DATA_OPTIONS)
@click.option("--iters", type=int, default=None, help="Override the number of training iterations.")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default=None, help="Autocast precision.")
@click.option("--deterministic", is_flag=True, help="PyTorch deterministic algorithms (slower).")
@click.option("--tracking-uri", default=None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or ./mlflow.db).")
@click.pass_context
def sweep_group(ctx: click.Context, rows: Optional[str], seeds_text: str, slurm_args: tuple[str, ...],
                time_limit: Optional[str], max_requeues: Optional[int], **options) -> None:
    """One job per (row, seed) not yet done or running, on Slurm (or locally) through submitit; `status`, `cancel`."""
    if ctx.invoked_subcommand is not None:
        return
    from harness.sweep import DEFAULT_MAX_REQUEUES, SweepOptions, parse_slurm_args, sweep
    from harness.verdicts import parse_seeds

    if not rows:
        raise BenchError("bench sweep needs --rows GLOB[,GLOB] (e.g. --rows '*' for the whole table), or a "
                         "subcommand: status, cancel")
    sweep(SweepOptions(rows=rows, seeds=parse_seeds(seeds_text), slurm_args=parse_slurm_args(slurm_args),
                       time=time_limit, max_requeues=DEFAULT_MAX_REQUEUES if max_requeues is None else max_requeues,
                       **options), echo=click.echo)


@sweep_group.command("status")
@click.argument("sweep_dir", required=False, type=click.Path(file_okay=False, path_type=Path))
def sweep_status(sweep_dir: Optional[Path]) -> None:
    """Each (row, seed) of a sweep (default: the newest): state, job, progress, last log line, log."""
    from harness.sweep import render_status

    click.echo(render_status(sweep_dir))


@sweep_group.command("cancel")
@click.argument("sweep_dir", required=False, type=click.Path(file_okay=False, path_type=Path))
def sweep_cancel(sweep_dir: Optional[Path]) -> None:
    """Cancel a sweep's pending and running jobs (default: the newest sweep)."""
    from harness.sweep import cancel

    for line in cancel(sweep_dir):
        click.echo(line)


if __name__ == "__main__":
    main()
