"""The `bench` command line: parses arguments and delegates to harness.commands; every BenchError becomes one line."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional

import click

from harness.config.benchmark import BEHIND_MARGIN, DATASETS, REFERENCE_DATASET
from harness.config.launchers import DEFAULT_MAX_REQUEUES, EXECUTORS
from harness.config.precision import PRECISIONS
from harness.errors import BenchError, record_worker_error
from harness.logs import configure_logging


class BenchGroup(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        configure_logging()
        try:
            return super().invoke(ctx)
        except BenchError as exc:
            if not record_worker_error(str(exc)):  # a torchrun worker's error is reported once, by its launcher
                click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)


@click.group(cls=BenchGroup)
def main() -> None:
    """segbench: reproduce the Cityscapes benchmark table, one row at a time."""


# Options several commands share, declared once.
SYNTHETIC_OPTION = click.option("--synthetic", is_flag=True,
                                help="Use the generated synthetic dataset (and its CPU-sized budget).")
DATA_ROOT_OPTION = click.option("--data-root", type=str, default=None,
                                help="Cityscapes root (default: $CITYSCAPES_DATASET).")
DATA_OPTIONS = (SYNTHETIC_OPTION, DATA_ROOT_OPTION)
DEVICE_OPTION = click.option("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available).")
PRECISION_OPTION = click.option("--precision", type=click.Choice(PRECISIONS), default=None,
                                help="Autocast precision (default: bf16 on GPU, fp32 on CPU).")
DEVICE_OPTIONS = (DEVICE_OPTION, PRECISION_OPTION)
COMPUTE_OPTIONS = (
    click.option("--channels-last/--no-channels-last", default=None,
                 help="channels_last memory format for the model and its inputs (default: on a GPU, not on CPU)."),
    click.option("--fused/--no-fused", default=None,
                 help="The fused SGD kernel (default: on a GPU, not on CPU)."),
)
TRACKING_URI_OPTION = click.option(
    "--tracking-uri", default=None,
    help="Tracking store: an MLflow URI (default: $MLFLOW_TRACKING_URI or ./mlflow.db), or tensorboard:DIR.")
TRACKING_OPTIONS = (
    TRACKING_URI_OPTION,
    click.option("--offline-tracking", is_flag=True,
                 help="Do not contact the tracking store: log into the run folder only; `bench sync` sends it later."),
)
ITERS_OPTION = click.option("--iters", type=int, default=None, help="Override the number of training iterations.")
DETERMINISTIC_OPTION = click.option("--deterministic", is_flag=True, help="PyTorch deterministic algorithms (slower).")
TOLERANCE_OPTION = click.option(
    "--tolerance", type=float, default=None,
    help="mIoU points the mean may differ from the reference mean (or lie within the reference's span); "
         "default: the table's (experiments/_table.yaml).")


def reply(text: str, problems: Sequence[str] = (), exit_code: int = 0) -> None:
    """Show what a verb's layer answered: its text on stdout, then its problems on stderr (one line each), and exit
    with its code."""
    click.echo(text)
    for line in problems:
        click.echo(line, err=True)
    sys.exit(exit_code)


def with_options(*groups: tuple[Callable, ...]) -> Callable:
    """Apply option groups to a command, in the order listed."""
    def decorate(command: Callable) -> Callable:
        for option in reversed([option for group in groups for option in group]):
            command = option(command)
        return command
    return decorate


@main.command("list")
@click.option("--sizes", is_flag=True,
              help="Add each row's parameter count and GFLOPs at its test size, measured with "
                   "torch.utils.flop_counter (a multiply-add counts as 2 FLOPs).")
def list_command(sizes: bool) -> None:
    """All rows in table order, then our rows (spec files `_table.yaml` does not list)."""
    from harness.commands.list_rows import list_rows

    click.echo(list_rows(sizes))


@main.command("new-row")
@click.argument("name")
@click.option("--arch", required=True,
              help="A segmentation-models-pytorch architecture, e.g. Unet, FPN, DeepLabV3Plus.")
@click.option("--encoder", required=True, help="An smp encoder (e.g. resnet50) or 'tu-' + a timm model name.")
@click.option("--from", "source", default="deeplabv3-r50", show_default=True, help="The row whose recipe it inherits.")
def new_row_command(name: str, arch: str, encoder: str, source: str) -> None:
    """Write experiments/NAME.yaml: one of our rows, ARCH on ENCODER with a table row's recipe."""
    from harness.commands.new_row import new_row

    text, notes = new_row(name, arch, encoder, source)
    reply(text, notes)


@main.command()
@click.argument("row")
def show(row: str) -> None:
    """The resolved spec of ROW."""
    from harness.commands.show import show as show_row

    click.echo(show_row(row), nl=False)


@main.command()
@click.option("--row", required=True, help="Row id, e.g. sf_seg_v2-ema (see `bench list`).")
@with_options(DATA_OPTIONS, DEVICE_OPTIONS, COMPUTE_OPTIONS, TRACKING_OPTIONS, (ITERS_OPTION,))
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
@with_options((DETERMINISTIC_OPTION,))
@click.option("--init-checkpoint", type=click.Path(dir_okay=False), default=None,
              help="Start from this whole-model checkpoint (overrides model.init_checkpoint).")
@click.option("--compile", "compile_model", is_flag=True, help="Run the model through torch.compile.")
@click.option("--eval-every", type=int, default=None,
              help="Evaluate every N iterations and keep the best (default: the recipe's, every 5 epochs).")
@click.option("--decoded-cache", type=click.Path(file_okay=False), default=None, metavar="DIR",
              help="Read decoded frames from this folder (built on first use, ~8 MiB a frame) instead of decoding "
                   "PNGs every epoch: for rows that train faster than the cores can decode.")
@click.option("--stop-if-behind", type=float, is_flag=False, flag_value=BEHIND_MARGIN, default=None,
              metavar="[MIOU]", help=f"End the run (checkpoint kept, resumable) at the first evaluation more than MIOU "
                                     f"points (default {BEHIND_MARGIN:g}) or 3x their spread behind earlier runs of "
                                     "the row, dataset and budget.")
@click.option("--no-system-metrics", is_flag=True,
              help="Do not log CPU, memory, disk, network and GPU metrics to MLflow.")
def run(row: str, seed: int, seeds_text: Optional[str], gpus: int, nnodes: int, node_rank: int,
        master_addr: Optional[str], master_port: Optional[int], compile_model: bool, **options: Any) -> None:
    """Train and evaluate one row; track it, write a result record, regenerate benchmark.md."""
    from harness.commands.run import run as run_rows
    from harness.launch.options import LaunchOptions, RunOptions

    launch = LaunchOptions(gpus, nnodes, node_rank, master_addr, master_port)
    sys.exit(run_rows(RunOptions(row=row, seed=seed, compile=compile_model, **options), seeds_text, launch,
                      echo=click.echo))


@main.command()
@click.option("--rows", "pattern", default="*", show_default=True, help="Rows to list (a glob).")
@click.option("--verify", is_flag=True, help="Hash the present files against their published SHA-1; exit 1 on a "
                                            "mismatch.")
def weights(pattern: str, verify: bool) -> None:
    """Each starting-weight file the rows expect, once: its rows, where it comes from, and its status."""
    from harness.commands.weights import weights as list_weights

    report = list_weights(pattern, verify)
    reply(report.text, report.problems(), report.exit_code)


@main.command()
@click.option("--dataset", type=click.Choice(DATASETS), default=None,
              help="The dataset's table (default: cityscapes; with --all and no --dataset: every dataset).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write here instead (synthetic tables are only printed unless --out is given).")
@click.option("--all", "all_records", is_flag=True,
              help="List every record (of every dataset, or of --dataset's table) with its kind and why it does or "
                   "does not count.")
@with_options((TOLERANCE_OPTION,))
def table(dataset: Optional[str], out: Optional[Path], all_records: bool, tolerance: Optional[float]) -> None:
    """Regenerate benchmark.md and benchmark.png from experiments/ and results/ (Cityscapes reproductions only)."""
    from harness.commands.table import table as make_table

    text, message = make_table(dataset, out, all_records, tolerance)
    click.echo(text, nl=message)


@main.command()
@click.option("--rows", "pattern", default="*", show_default=True, help="Rows to check (a glob).")
@with_options((TOLERANCE_OPTION,))
@click.option("--json", "as_json", is_flag=True, help="Print the verdicts as JSON.")
def check(pattern: str, tolerance: Optional[float], as_json: bool) -> None:
    """Each row's verdict from the Cityscapes reproductions; exit 1 if a row with results is outside the tolerance."""
    from harness.commands.check import check as check_verdicts

    text, code = check_verdicts(pattern, tolerance, as_json)
    reply(text, exit_code=code)


CHECKPOINT_OPTIONS = (
    click.option("--row", default=None,
                 help="Row id whose model and test settings to use (default: the checkpoint's row)."),
    click.option("--checkpoint", required=True, type=click.Path(dir_okay=False),
                 help="A segbench checkpoint (runs/<dataset>/<row>/<stamp>/checkpoints/ckpt-*.pt)."),
    click.option("--weights", type=click.Choice(["ema", "raw"]), default=None,
                 help="Which weights of the checkpoint (default: ema for EMA rows, raw otherwise)."),
    *DATA_OPTIONS, *DEVICE_OPTIONS,
)


@main.command("eval")
@with_options(CHECKPOINT_OPTIONS)
@click.option("--split", default="val", show_default=True, help="A labelled split.")
@click.option("--save-predictions", type=click.Path(file_okay=False), default=None,
              help="Also write labelId PNGs here, as the official evaluator reads them.")
@click.option("--panels", type=int, default=4, show_default=True, help="Image/truth/prediction panels to log.")
@with_options(TRACKING_OPTIONS)
def eval_command(panels: int, **options: Any) -> None:
    """Evaluate a checkpoint; track it and write a result record."""
    from harness.commands.evaluate import EvalOptions, closing_line, evaluate_checkpoint

    click.echo(closing_line(evaluate_checkpoint(EvalOptions(num_panels=panels, **options))))


@main.command("predict")
@with_options(CHECKPOINT_OPTIONS)
@click.option("--split", default="test", show_default=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for the labelId PNGs (<city>/<image name>); default: the checkpoint's run folder's "
                   "predictions/<split>-<weights>/ (under runs/, out of git).")
@click.option("--zip", "zip_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The test-server zip (default: <out>.zip).")
def predict_command(out: Optional[Path], zip_path: Optional[Path], row: Optional[str], checkpoint: str,
                    weights: Optional[str], synthetic: bool, data_root: Optional[str], device: Optional[str],
                    precision: Optional[str], split: str) -> None:
    """Write labelId predictions for a split and pack them into the Cityscapes test-server zip."""
    from harness.commands.predict import predict_to_zip

    click.echo(predict_to_zip(checkpoint, row, weights, synthetic, data_root, split, device, precision, out,
                              zip_path))


@main.command()
@click.option("--dataset", type=click.Choice(DATASETS), default=None,
              help="Open this dataset's experiment (default: the newest training run's).")
@with_options((TRACKING_URI_OPTION,))
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on (loopback unless told).")
@click.option("--port", type=int, default=5000, show_default=True)
def ui(dataset: Optional[str], tracking_uri: Optional[str], host: str, port: int) -> None:
    """Serve the MLflow UI on the project's store and print the URL of the training runs table."""
    from harness.commands.ui import ui as serve

    sys.exit(serve(dataset, tracking_uri, host, port, echo=click.echo))


@main.command()
@click.option("--backend-store-uri", default=None, metavar="URI",
              help="Database the server keeps runs in: postgresql://user@host/db for a cluster (pip install "
                   "'segbench[cluster]'), sqlite:///path.db for one machine (default: the project's store).")
@click.option("--artifacts", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for run artifacts, served by the server (default: ./mlartifacts).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Interface to listen on (loopback unless told; 0.0.0.0 for jobs on other nodes).")
@click.option("--port", type=int, default=5000, show_default=True)
@click.option("--workers", type=int, default=4, show_default=True, help="Server processes answering the jobs.")
def server(backend_store_uri: Optional[str], artifacts: Optional[Path], host: str, port: int, workers: int) -> None:
    """Serve an MLflow tracking server many jobs can log to at once, and print the URI they should use."""
    from harness.commands.server import server as serve

    sys.exit(serve(backend_store_uri, artifacts, host, port, workers, echo=click.echo))


@main.command()
@click.argument("run_dirs", nargs=-1, type=click.Path(file_okay=False, path_type=Path))
@with_options((TRACKING_URI_OPTION,))
@click.option("--skip-damaged", is_flag=True,
              help="Exit 0 even when journal lines are damaged (they are named and cannot be sent).")
def sync(run_dirs: tuple[Path, ...], tracking_uri: Optional[str], skip_damaged: bool) -> None:
    """Send what runs logged locally (offline, or while the store was unreachable) to the tracking store, or to
    another one with --tracking-uri; default: every run with entries that store lacks."""
    from harness.commands.sync import sync as sync_runs

    report = sync_runs(list(run_dirs), tracking_uri, skip_damaged)
    reply(report.text, report.problems(), report.exit_code)


@main.command()
@click.option("--row", default="", help="Row id (see `bench list`).")
@click.option("--rows", "rows_pattern", default=None, metavar="GLOB[,GLOB]",
              help="Several rows one after another ('all': every row; a light-seg row is its base row's network).")
@click.option("--budget-s", type=float, default=None,
              help="With --rows: start no row that would end past this many seconds; list the rows not reached.")
@click.option("--mode", type=click.Choice(["train", "infer", "eval", "data", "all"]), default="all", show_default=True)
@click.option("--batch", type=int, default=None, help="Images per step (default: the row's batch; 1 for infer).")
@with_options(DEVICE_OPTIONS, COMPUTE_OPTIONS)
@click.option("--compile", "compile_model", is_flag=True, help="Run the model through torch.compile.")
@click.option("--size", default=None, metavar="W,H",
              help="Image size for every mode (default: crop, test size and 2048x1024 frames; small ones on CPU).")
@click.option("--data-root", default=None, help="Time the loader on this Cityscapes root instead of generated frames.")
@click.option("--workers", type=int, default=None,
              help="Loader workers in data and eval modes (default: the spec's, i.e. this machine's cores).")
@click.option("--warmup", type=int, default=None, help="Untimed steps first (default: 10 on GPU, 1 on CPU).")
@click.option("--repeats", type=int, default=None, help="Timed runs; the median is reported (default: 5 / 3).")
@click.option("--steps", type=int, default=None, help="Steps per timed run (default: 10 / 1).")
@click.option("--onnx", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help="Also time onnxruntime on this exported ONNX file, beside PyTorch's inference at its size.")
@click.option("--keep-record", is_flag=True,
              help="On a CPU, file the record under results/speed/ (committed, read by benchmark.md's inference "
                   "column) instead of runs/speed/ (out of git).")
def speed(row: str, rows_pattern: Optional[str], budget_s: Optional[float], compile_model: bool,
          size: Optional[str], **options: Any) -> None:
    """Time a row's training step, inference, evaluation loop and data loading; write a record, print a table."""
    from harness.commands.speed import speed as measure_speed
    from harness.engine.benchmark import SpeedOptions
    from harness.launch.options import parse_size

    speed_options = SpeedOptions(row=row, compile=compile_model, size=parse_size(size), **options)
    measure_speed(speed_options, rows_pattern, budget_s, echo=click.echo)


@main.command("doctor")
@click.option("--row", required=True, help="Row id (see `bench list`).")
@click.option("--gpus", type=int, default=1, show_default=True, help="Processes (GPUs) per node the run will use.")
@click.option("--nodes", type=int, default=1, show_default=True, help="Nodes the run will use.")
@with_options(DATA_OPTIONS, (TRACKING_URI_OPTION, ITERS_OPTION))
@click.option("--device", default=None,
              help="The GPU the run will use: a short name (h100, a100-80gb, ...), a product or torch name, or a "
                   "device with speed records (default: this machine's GPU, else the newest GPU speed record's).")
@click.option("--writers", type=int, default=1, show_default=True,
              help="Processes that will write to the tracking store at once (a sweep's concurrent jobs).")
@click.option("--probe/--no-probe", default=True, show_default=True,
              help="Without a speed record, measure one training step on this machine's GPU for the memory check.")
def doctor_command(**options: Any) -> None:
    """Go / no-go checks before an expensive run: dataset, starting weights, batch, GPU memory, disk, tracking store,
    wall time; exit 1 on any no-go."""
    from harness.commands.doctor import doctor
    from harness.report.readiness import DoctorOptions

    report = doctor(DoctorOptions(**options))
    reply(report.text, exit_code=report.exit_code)


@main.command("plan")
@click.option("--rows", "pattern", default="*", show_default=True, metavar="GLOB[,GLOB]",
              help="Rows to plan (globs; 'all': every row).")
@click.option("--gpus", type=int, default=8, show_default=True, help="GPUs per run (the table's rows used 8).")
@click.option("--seeds", type=int, default=1, show_default=True, help="Runs per row.")
@click.option("--device", default=None,
              help="The GPU the figures are for: a short name (h100, a100-80gb, l40s, ...), a product or torch name, "
                   "a device with speed records, or cpu; default: this machine's GPU, else the newest GPU speed "
                   "record's.")
def plan_command(pattern: str, gpus: int, seeds: int, device: Optional[str]) -> None:
    """Iterations, images, GPU-hours and wall time per row and in total, from `bench speed` records or estimated."""
    from harness.commands.plan import plan

    click.echo(plan(pattern, gpus, seeds, device))


@main.command()
@click.argument("runs", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True, help="Print the comparison as JSON.")
@click.option("--figure", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write a per-class IoU heatmap (runs x classes) here, as PNG.")
@click.option("--dataset", type=click.Choice(DATASETS), default=REFERENCE_DATASET, show_default=True,
              help="Whose records a row argument averages (Cityscapes: its counted runs).")
@with_options((TRACKING_URI_OPTION,))
def compare(runs: tuple[str, ...], as_json: bool, figure: Optional[Path], dataset: str,
            tracking_uri: Optional[str]) -> None:
    """Per-class IoU of RUNS side by side (run folders, result records, MLflow run ids or rows), largest gap first,
    with the recipe fields and versions that differ."""
    from harness.commands.compare import compare as compare_runs

    click.echo(compare_runs(list(runs), as_json=as_json, figure=figure, tracking_uri=tracking_uri, dataset=dataset))


@main.command()
@click.argument("run", type=click.Path(file_okay=False, path_type=Path))
@with_options((TRACKING_URI_OPTION,))
def report(run: Path, tracking_uri: Optional[str]) -> None:
    """(Re)write the reproduction card report.md of a finished run folder and log it to its tracked run."""
    from harness.commands.report import report as write_report

    click.echo(write_report(run, tracking_uri))


@main.command()
@click.option("--checkpoint", required=True, type=click.Path(dir_okay=False),
              help="A segbench checkpoint (runs/<dataset>/<row>/<stamp>/checkpoints/ckpt-*.pt or best.pt).")
@click.option("--format", "fmt", type=click.Choice(["onnx", "safetensors"]), required=True)
@click.option("--weights", type=click.Choice(["ema", "raw"]), default=None,
              help="Which weights of the checkpoint (default: ema for EMA rows, raw otherwise).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The file to write (default: beside the checkpoint, <checkpoint>-<weights>.onnx|.safetensors).")
@click.option("--size", default=None, metavar="W,H",
              help="ONNX image size (default: the test size the checkpoint was trained for).")
@click.option("--row", default=None, help="Row id (default: the checkpoint's row).")
def export(checkpoint: str, fmt: str, weights: Optional[str], out: Optional[Path], size: Optional[str],
           row: Optional[str]) -> None:
    """Write a checkpoint's network as ONNX (checked by onnxruntime against PyTorch) or safetensors."""
    from harness.commands.export import export as export_model
    from harness.launch.options import parse_size

    click.echo(export_model(checkpoint, fmt, weights, out, parse_size(size), row))


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
    from harness.commands.data import synthetic

    click.echo(synthetic(out, seed, train_images, val_images))


@data.command("cache")
@with_options((DATA_ROOT_OPTION,))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the decoded frames (about 23 GiB for train, 4 GiB for val).")
@click.option("--splits", default="train,val", show_default=True, help="Comma-separated labelled splits.")
def data_cache(data_root: Optional[str], out: Path, splits: str) -> None:
    """Decode a Cityscapes tree once into memory-mapped files for `bench run --decoded-cache`."""
    from harness.commands.data import cache

    cache(data_root, out, splits)


@data.command("check")
@with_options(DATA_OPTIONS)
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Processes decoding labels (and images with --full) (default: the CPU count).")
@click.option("--subset", is_flag=True,
              help="A subset or another frame size: skip the official counts and 2048x1024 (the synthetic dataset "
                   "is recognised and checked by its own rule).")
@click.option("--full", is_flag=True,
              help="Decode every image, not only its header: finds files cut short behind an intact header.")
def data_check(synthetic: bool, data_root: Optional[str], workers: Optional[int], subset: bool, full: bool) -> None:
    """Validate a whole Cityscapes tree before an expensive run; exits 1 on any defect."""
    from harness.commands.data import check as check_tree

    text, code = check_tree(data_root, workers, subset, full, synthetic)
    reply(text, exit_code=code)


@main.group("sweep", invoke_without_command=True)
@click.option("--rows", "rows", default=None, metavar="GLOB[,GLOB]", help="Rows to run (globs; see `bench list`).")
@click.option("--seeds", "seeds_text", default="0", show_default=True, metavar="LIST",
              help="Seeds per row, e.g. 0,1,2.")
@click.option("--executor", type=click.Choice(EXECUTORS), default=EXECUTORS[0], show_default=True,
              help="Slurm through submitit, or submitit's local executor (this machine).")
@click.option("--gpus-per-node", type=int, default=None,
              help="GPUs (torchrun processes) per node (default: 8 on Slurm, 1 locally); 0: CPU-only nodes.")
@click.option("--max-parallel", type=int, default=None,
              help="Local executor: jobs at once, each given its share of the cores (default: from the cores).")
@click.option("--nodes", type=int, default=1, show_default=True, help="Nodes per job.")
@click.option("--partition", default=None, help="Slurm partition.")
@click.option("--time", "time_limit", default=None, metavar="HH:MM:SS",
              help="Time limit per job; jobs requeue past it.")
@click.option("--account", default=None, help="Slurm account.")
@click.option("--qos", default=None, help="Slurm QOS.")
@click.option("--slurm-arg", "slurm_args", multiple=True, metavar="KEY=VALUE", help="Extra sbatch flag (repeatable).")
@click.option("--max-requeues", type=int, default=None,
              help=f"Requeues per job before it is marked failed (default {DEFAULT_MAX_REQUEUES}).")
@click.option("--dry-run", is_flag=True, help="Print the jobs and the sbatch script; submit nothing.")
@click.option("--wait/--no-wait", default=None, help="Wait for the jobs (default: locally yes, on Slurm no).")
@click.option("--device", default=None,
              help="The GPU the jobs run on, for the chosen --time and the memory check (as `bench plan --device`).")
@with_options(DATA_OPTIONS, (ITERS_OPTION, PRECISION_OPTION, DETERMINISTIC_OPTION, TRACKING_URI_OPTION))
@click.pass_context
def sweep_group(ctx: click.Context, rows: Optional[str], seeds_text: str, slurm_args: tuple[str, ...],
                time_limit: Optional[str], max_requeues: Optional[int], **options: Any) -> None:
    """One job per (row, seed) not yet done or running, on Slurm (or locally) through submitit; `status`, `cancel`."""
    if ctx.invoked_subcommand is not None:
        return
    from harness.commands.sweep import sweep
    from harness.launch.sweep import sweep_options

    sweep(sweep_options(rows, seeds_text, slurm_args, max_requeues, time=time_limit, **options), echo=click.echo)


@sweep_group.command("status")
@click.argument("sweep_dir", required=False, type=click.Path(file_okay=False, path_type=Path))
def sweep_status(sweep_dir: Optional[Path]) -> None:
    """Each (row, seed) of a sweep (default: the newest): state, job, progress, last log line, log."""
    from harness.commands.sweep import status

    click.echo(status(sweep_dir))


@sweep_group.command("cancel")
@click.argument("sweep_dir", required=False, type=click.Path(file_okay=False, path_type=Path))
def sweep_cancel(sweep_dir: Optional[Path]) -> None:
    """Cancel a sweep's pending and running jobs (default: the newest sweep)."""
    from harness.commands.sweep import cancel_jobs

    for line in cancel_jobs(sweep_dir):
        click.echo(line)


if __name__ == "__main__":
    main()
