"""One JSON record per finished run under results/<dataset>/<row>/, written atomically, never overwritten; and the
environment a record names (commit, package versions).

Records are typed, one dataclass per kind: a training run (`TrainRecord`, what `bench run` writes), an evaluation
(`EvalRecord`, `bench eval`) and a speed measurement (`SpeedRecord`, `bench speed`, in its own folder `speed_dir`).
Their fields, the one writer of each (`write_result_record`, `write_speed_record`) and the one reader
(`read_record` / `load_records`, `read_speed_record` / `load_speed_records`) live here; the reader checks every
field against the dataclass's type hints and refuses a file that does not match in one line naming the file, the
field and the fix. A record names the schema it was written by (`schema`); records of schema 0 (written before there
was one: a training or evaluation record naming its tracked run `mlflow_run_id`, a speed record with the device's
name also in a field called "dataset") still read."""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, ClassVar, Optional, TypeVar, Union, get_args, get_origin, get_type_hints

from harness.errors import BenchError
from harness.files import check_writable, new_temporary_file
from harness.paths import PROJECT_ROOT, results_dir, runs_dir

SCHEMA_VERSION = 1  # of every record written now; records without a "schema" field are schema 0
SPEED = "speed"  # results/speed/<device>/<row>/: bench speed's records, beside the datasets' folders
PACKAGES = ("torch", "torchvision", "timm", "segmentation-models-pytorch", "mlflow", "numpy", "pillow",
            "onnx", "onnxruntime", "segbench")


def git_commit() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=PROJECT_ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _driver_version() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10, check=True).stdout.split()
        return out[0] if out else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(device_type: str) -> dict[str, Any]:
    """What a run ran on beyond the package versions: the GPUs of this machine (model and count), the NVIDIA
    driver, the CUDA and cuDNN PyTorch uses, the CPU and the OS."""
    import torch

    env: dict[str, Any] = {"device_type": device_type, "os": platform.platform(), "cpu": _cpu_model(),
                           "cpu_count": os.cpu_count(), "cuda_build": torch.version.cuda,
                           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}
    if device_type == "cuda" and torch.cuda.is_available():
        env.update(gpu=torch.cuda.get_device_name(0), gpu_count=torch.cuda.device_count(),
                   driver=_driver_version())
    else:
        env.update(gpu=None, gpu_count=0, driver=None)
    return env


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def strict_json(data: dict[str, Any]) -> dict[str, Any]:
    """A record's JSON object as strict JSON allows: a per-class IoU that is undefined (a class absent from ground
    truth and prediction) becomes null; any other non-finite number is an error, never NaN in a file."""

    def clean(value: Any, key: str, nested: bool) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            if nested:
                return None
            raise BenchError(f"result {key} is {value} (undefined); no record is written for run "
                             f"{data.get('row')} on {data.get('dataset')}")
        if isinstance(value, dict):
            return {k: clean(v, f"{key}.{k}" if key else str(k), nested or bool(key)) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v, f"{key}[{i}]", nested) for i, v in enumerate(value)]
        return value

    return clean(data, "", False)


def write_record(data: dict[str, Any], root: Optional[Path] = None, group: Optional[str] = None) -> Path:
    """Publish a record's JSON object under <root>/<group (default: its dataset)>/<row>/ with a new name; an
    existing record is never replaced, and a failed write leaves nothing behind (not even a partial temporary file).
    The file writer of every kind (`write_result_record`, `write_speed_record`)."""
    root = root or results_dir()
    data = strict_json(data)
    folder = root / (group or data["dataset"]) / data["row"]
    stamp = data["time"].replace(":", "").replace("-", "")
    base = f"{stamp}-{str(data.get('tracking_run_id') or 'norun')[:8]}"  # a speed record has no tracked run
    tmp = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle, tmp = new_temporary_file(folder, prefix=".tmp-", suffix=".json")
        with os.fdopen(handle, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True, allow_nan=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        for attempt in range(100):
            target = folder / (f"{base}.json" if attempt == 0 else f"{base}-{attempt}.json")
            try:
                os.link(tmp, target)  # fails if the name exists: no record is ever overwritten
                return target
            except FileExistsError:
                continue
        raise BenchError(f"cannot find a free record name under {folder}")
    except OSError as exc:
        raise BenchError(f"cannot write the result record under {folder}: {exc.strerror or exc}; free space or make "
                         f"it writable (or point SEGBENCH_RESULTS elsewhere); the run's checkpoints are kept") from None
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def check_output_folders(dataset: str, create: bool = True) -> None:
    """A read-only or missing-permission runs/ or results/ fails now, not after the training (`bench run`; `bench
    doctor` asks the same without creating them)."""
    check_writable(runs_dir() / dataset, "run folder", "set SEGBENCH_RUNS to another folder", create)
    check_writable(results_dir() / dataset, "results folder", "set SEGBENCH_RESULTS to another folder", create)


# --- typed records: what every kind shares -------------------------------------------------------


class TypedRecord:
    """What the record dataclasses share: their kind, the fix a reader names when it refuses one of their files,
    and their JSON form (the kind first; the path it was read from or written to is no part of it)."""

    __dataclass_fields__: ClassVar[dict[str, Any]]  # each subclass is a dataclass
    kind: ClassVar[str]
    fix: ClassVar[str]  # how to mend a file the reader refuses

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        del data["path"]
        return {"kind": self.kind, **data}


# JSON's names for the types a record's fields hold, as a refusal says them
JSON_NAMES = {str: "string", int: "integer", float: "number", bool: "boolean", list: "array", dict: "object"}


def _json_name(hint: Any) -> str:
    if get_origin(hint) is Union:
        return " or ".join("null" if arg is type(None) else _json_name(arg) for arg in get_args(hint))
    return JSON_NAMES.get(get_origin(hint) or hint, str(hint))


def _check(value: Any, hint: Any, name: str, where: str, fix: str, shown: Any = None) -> None:
    """Refuse `value` unless it and its items are of the type hint `hint` (str, int, float, bool, Any, Optional,
    list[...], dict[str, ...]): a one-line error naming the file (`where`), the field and `fix`. A bool is no
    number; an int is a float (a float field may hold a whole number). `shown`: the hint the error names."""
    origin, args = get_origin(hint), get_args(hint)
    shown = shown or hint
    if hint is Any or (value is None and origin is Union and type(None) in args):
        return
    if origin is Union:  # Optional[X] holding a value: an X
        (inner,) = [arg for arg in args if arg is not type(None)]
        _check(value, inner, name, where, fix, shown)
        return
    if hint is float:
        matches = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif hint is int:
        matches = isinstance(value, int) and not isinstance(value, bool)
    else:
        matches = isinstance(value, origin or hint)
    if not matches:
        raise BenchError(f"{where}: field {name!r} is {json.dumps(value)[:40]} ({type(value).__name__}), not "
                         f"{_json_name(shown)}; {fix}")
    if isinstance(value, list) and args:
        for i, item in enumerate(value):
            _check(item, args[0], f"{name}[{i}]", where, fix)
    elif isinstance(value, dict) and args:
        for key, item in value.items():
            _check(item, args[1], f"{name}.{key}", where, fix)


def checked_fields(data: dict[str, Any], hints: dict[str, Any], where: str, fix: str) -> dict[str, Any]:
    """data's value of each field in `hints` (name -> type hint), every one present and of its type."""
    for name, hint in hints.items():
        if name not in data:
            raise BenchError(f"{where}: field {name!r} is missing; {fix}")
        _check(data[name], hint, name, where, fix)
    return {name: data[name] for name in hints}


def record_fields(cls: type[TypedRecord]) -> dict[str, Any]:
    """The fields a record of `cls` holds in its file, with their type hints (the dataclass's own, so a field's
    type is written once)."""
    hints = get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls) if f.name != "path"}


# --- training and evaluation records -------------------------------------------------------------

TRAIN, EVAL = "train", "eval"  # the kinds of result record under results/<dataset>/
PerClass = dict[str, Optional[float]]  # class name -> IoU (%); None (NaN before it is written): undefined


@dataclass(frozen=True)
class TrainRecord(TypedRecord):
    """What `bench run` writes when a training finishes (harness.report.finish.training_record)."""

    kind: ClassVar[str] = TRAIN
    fix: ClassVar[str] = "correct the file or remove it (train the run again with `bench run`)"

    row: str
    dataset: str
    seed: int
    # The one headline, the row's statistic (harness.report.verdicts.measured_miou): what MLflow's `miou`, the
    # closing line and both tables show; of the weights `miou_weights` ("ema" or "raw") at `miou_iteration`.
    miou: float
    miou_weights: str
    miou_iteration: int
    miou_final: float  # the raw weights' final evaluation
    pixel_accuracy: float
    miou_ema: Optional[float]  # the EMA weights' final evaluation; None for a row without EMA
    # UP evaluated every 5 epochs and kept the best (auto_save_best): the table reports the best, the record keeps
    # both so nothing is hidden.
    miou_best: float
    best_iteration: int
    miou_ema_best: Optional[float]
    best_iteration_ema: Optional[int]
    best_checkpoint: Optional[str]  # None: no evaluation kept a best checkpoint
    starting_weights: str  # harness.config.starting_weights: "loaded ...", "missing ...", "other ...", ...
    per_class_iou: PerClass  # of the raw weights
    per_class_iou_ema: Optional[PerClass]
    iterations: int
    batch_size: int
    crop_size: list[int]
    # The table counts a run only on the official split sizes (harness.report.verdicts.standing).
    train_images: int
    val_images: int
    devices: int  # processes that trained
    device: str  # "cuda" or "cpu"
    precision: str
    checkpoint: str  # the final checkpoint
    wall_time_s: float
    git_commit: str
    behind: Optional[dict[str, Any]]  # the newest early-warning comparison (harness.report.behind); None: none made
    data_digests: Optional[dict[str, str]]  # split -> digest of its files; None: a schema-0 record
    versions: dict[str, str]
    environment: dict[str, Any]  # harness.report.records.environment
    plan: dict[str, Any]  # the resolved TrainPlan
    time: str
    tracking_run_id: Optional[str] = None  # None: tracked offline (or not yet started, before finish_run)
    weight_files: list[dict[str, Any]] = field(default_factory=list)  # what, path, sha256 of the starting weights
    schema: int = SCHEMA_VERSION
    path: Optional[str] = field(default=None, compare=False)  # the file it was read from or written to


@dataclass(frozen=True)
class EvalRecord(TypedRecord):
    """What `bench eval` writes: a checkpoint's weights scored on a labelled split
    (harness.commands.evaluate.evaluate_checkpoint)."""

    kind: ClassVar[str] = EVAL
    fix: ClassVar[str] = "correct the file or remove it (evaluate the checkpoint again with `bench eval`)"

    row: str
    dataset: str
    split: str
    weights: str  # "ema" or "raw": which weights of the checkpoint were scored
    checkpoint: str
    miou: float
    pixel_accuracy: float
    per_class_iou: PerClass  # of the scored weights
    test_size: list[int]
    test_mode: str  # harness.engine.evaluate.TestMode.describe
    device: str
    precision: str
    wall_time_s: float
    git_commit: str
    versions: dict[str, str]
    environment: dict[str, Any]
    plan: dict[str, Any]
    tracking_run_id: Optional[str]  # None: tracked offline
    time: str
    weight_files: list[dict[str, Any]] = field(default_factory=list)  # the checkpoint, with its checksum
    schema: int = SCHEMA_VERSION
    path: Optional[str] = field(default=None, compare=False)


ResultRecord = Union[TrainRecord, EvalRecord]
RESULT_KINDS: dict[str, type[ResultRecord]] = {TRAIN: TrainRecord, EVAL: EvalRecord}
# Fields a schema-0 record may lack: added to records the day the schema was, with the value that says so.
SCHEMA_0_ABSENT = {TRAIN: {"behind": None, "data_digests": None}, EVAL: {}}


def result_record_from_json(data: Any, where: str) -> ResultRecord:
    """A training or evaluation record from its JSON object, every field checked for its type (`where` names it in
    errors). A record of schema 0 (written before records named their schema) is read as schema 1: its
    `mlflow_run_id` is `tracking_run_id`, and the fields added with the schema are null."""
    if not isinstance(data, dict):
        raise BenchError(f"{where} holds a JSON {type(data).__name__}, not an object (a record is one JSON object, "
                         "as `bench run` writes it); fix or remove it")
    data = dict(data)
    cls = RESULT_KINDS.get(str(data.get("kind")))
    if cls is None:
        shown = json.dumps(data["kind"])[:40] if "kind" in data else "missing"
        raise BenchError(f"{where}: field 'kind' is {shown}, not one of {', '.join(map(json.dumps, RESULT_KINDS))} "
                         "(a result record of `bench run` or `bench eval`); correct the file or remove it")
    if "schema" not in data:
        data["schema"] = 0
        if "tracking_run_id" not in data:  # schema 0 named the tracked run after MLflow
            data["tracking_run_id"] = data.pop("mlflow_run_id", None)
        data = {**SCHEMA_0_ABSENT[cls.kind], **data}
    return cls(**checked_fields(data, record_fields(cls), where, cls.fix), path=None)


def read_record(path: Path) -> ResultRecord:
    """One result record (training or evaluation); a file that is not a JSON object of either kind, or a field of
    the wrong type, is a one-line error naming the file and the field."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BenchError(f"result record {path} is unreadable ({exc}); fix or remove it") from None
    return replace(result_record_from_json(data, f"result record {path}"), path=str(path))


def record_order(record: ResultRecord) -> tuple[str, str]:
    """The order of result records, the one sort key: oldest first, runs finished in the same second by their
    tracked run's id."""
    return record.time, record.tracking_run_id or ""


def load_records(root: Optional[Path] = None, dataset: Optional[str] = None) -> list[ResultRecord]:
    """Every record under `root` (default: results/), of one dataset or all, in their files' order."""
    root = root or results_dir()
    pattern = f"{dataset}/*/*.json" if dataset else "*/*/*.json"
    return [read_record(path) for path in sorted(root.glob(pattern)) if not path.name.startswith(".")]


AnyResult = TypeVar("AnyResult", TrainRecord, EvalRecord)


def write_result_record(record: AnyResult) -> AnyResult:
    """File a training or evaluation record under results/<dataset>/<row>/ (never replacing one); returns it with
    its path."""
    return replace(record, path=str(write_record(record.to_json())))


# --- bench speed's records -----------------------------------------------------------------------


def speed_dir() -> Path:
    """results/speed/: the folder of every `bench speed` record (results/speed/<device>/<row>/<stamp>.json)."""
    return results_dir() / SPEED


def local_speed_dir() -> Path:
    """runs/speed/: a CPU's `bench speed` records, this machine's figures, kept out of git and of benchmark.md's
    inference column (`bench speed --keep-record` files them under speed_dir)."""
    return runs_dir() / SPEED


# The fields every mode's entry holds (harness.engine.benchmark.timing_fields), with their types; each mode adds its
# own (flops_per_image, workers, providers, ...), kept as measured.
MODE_FIELDS: dict[str, Any] = {"batch": int, "size": list[int], "images_per_s": Optional[float],
                               "step_s": Optional[float], "peak_memory_gib": Optional[float]}


@dataclass(frozen=True)
class SpeedRecord(TypedRecord):
    """What `bench speed` measured of one row on one device: `modes` maps each mode timed ("train", "infer",
    "eval", "data", ...) to its figures (MODE_FIELDS and the mode's own)."""

    kind: ClassVar[str] = SPEED
    fix: ClassVar[str] = "remove the file, or measure again with `bench speed`"

    row: str
    device: str  # its name as harness.engine.device.device_name spells it (cpu-amd-epyc, nvidia-h100-80gb-hbm3)
    device_type: str  # "cuda" or "cpu"
    device_memory_gib: Optional[float]
    precision: str
    compile: bool
    channels_last: bool
    cpu_threads: int
    matmul_peak_tflops: Optional[float]
    matmul_peak_dtype: Optional[str]
    warmup: int
    repeats: int
    steps: int
    modes: dict[str, dict[str, Any]]
    git_commit: str
    versions: dict[str, str]
    time: str
    fused: bool = False  # the fused optimizer step (records before it: unfused)
    schema: int = SCHEMA_VERSION
    path: Optional[str] = field(default=None, compare=False)  # the file it was read from or written to


def speed_record_from_json(data: Any, where: str) -> SpeedRecord:
    """A speed record from its JSON object, every field checked for its type (`where` names it in errors)."""
    if not isinstance(data, dict):
        raise BenchError(f"{where} holds a JSON {type(data).__name__}, not a speed record object; remove it, or "
                         "measure again with `bench speed`")
    data = dict(data)
    data.setdefault("schema", 0)
    if data["schema"] == 0 and "device" not in data and isinstance(data.get("dataset"), str):
        data["device"] = data["dataset"]  # schema 0 named the device twice, once as "dataset"
    data.setdefault("fused", False)
    values = checked_fields(data, record_fields(SpeedRecord), where, SpeedRecord.fix)
    for mode, entry in values["modes"].items():
        checked_fields(entry, MODE_FIELDS, f"{where}: modes.{mode}", SpeedRecord.fix)
        if len(entry["size"]) != 2:
            raise BenchError(f"{where}: field 'modes.{mode}.size' is {json.dumps(entry['size'])[:40]}, not [width, "
                             f"height]; {SpeedRecord.fix}")
    return SpeedRecord(**values, path=where)


def read_speed_record(path: Path) -> SpeedRecord:
    """One `bench speed` record; an unreadable file or a field of the wrong type is one line naming both."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BenchError(f"speed record {path} is unreadable ({exc}); remove it, or measure again with "
                         "`bench speed`") from None
    return replace(speed_record_from_json(data, f"speed record {path}"), path=str(path))


def load_speed_records(device: Optional[str] = None) -> list[SpeedRecord]:
    """Every `bench speed` record (of one device, or all), oldest first."""
    folder = speed_dir()
    records = [read_speed_record(path) for path in sorted(folder.glob("*/*/*.json")) if not path.name.startswith(".")]
    return sorted((r for r in records if device is None or r.device == device), key=lambda r: r.time)


def write_speed_record(record: SpeedRecord, kept: bool = True) -> SpeedRecord:
    """File `record` under results/speed/<device>/<row>/ (runs/speed/ unless `kept`; never replacing one); returns
    it with its path."""
    written = write_record(record.to_json(), root=speed_dir() if kept else local_speed_dir(), group=record.device)
    return replace(record, path=str(written))
