"""One JSON record per finished run under results/<dataset>/<row>/, written atomically, never overwritten; and the
environment a record names (commit, package versions).

`bench speed`'s records are typed (`SpeedRecord`): their folder (`speed_dir`), their fields, the one writer
(`write_speed_record`) and the one reader (`read_speed_record`, `load_speed_records`) live here. A record names the
schema it was written by (`schema`); records of schema 0 (written before there was one, with the device's name also
in a field called "dataset") still read."""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Optional

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


def strict_json(record: dict[str, Any]) -> dict[str, Any]:
    """`record` as strict JSON allows: a per-class IoU that is undefined (a class absent from ground truth and
    prediction) becomes null; any other non-finite number is an error, never NaN in a file."""

    def clean(value: Any, key: str, nested: bool) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            if nested:
                return None
            raise BenchError(f"result {key} is {value} (undefined); no record is written for run "
                             f"{record.get('row')} on {record.get('dataset')}")
        if isinstance(value, dict):
            return {k: clean(v, f"{key}.{k}" if key else str(k), nested or bool(key)) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v, f"{key}[{i}]", nested) for i, v in enumerate(value)]
        return value

    return clean(record, "", False)


def write_record(record: dict[str, Any], root: Optional[Path] = None, group: Optional[str] = None) -> Path:
    """Publish `record` under <root>/<group (default: its dataset)>/<row>/ with a new name; an existing record is
    never replaced, and a failed write leaves nothing behind (not even a partial temporary file)."""
    root = root or results_dir()
    record = strict_json(record)
    folder = root / (group or record["dataset"]) / record["row"]
    stamp = record["time"].replace(":", "").replace("-", "")
    run_id = record.get("tracking_run_id", record.get("mlflow_run_id"))  # a speed record has no tracked run
    base = f"{stamp}-{str(run_id or 'norun')[:8]}"
    tmp = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle, tmp = new_temporary_file(folder, prefix=".tmp-", suffix=".json")
        with os.fdopen(handle, "w") as f:
            json.dump(record, f, indent=2, sort_keys=True, allow_nan=False)
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


def read_record(path: Path) -> dict[str, Any]:
    """One result record; a file that is not a JSON object is a one-line error naming it. A record of schema 0
    (written before records named their schema) is read as schema 1: its `mlflow_run_id` is `tracking_run_id`."""
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BenchError(f"result record {path} is unreadable ({exc}); fix or remove it") from None
    if not isinstance(record, dict):
        raise BenchError(f"result record {path} holds a JSON {type(record).__name__}, not an object (a record is "
                         "one JSON object, as `bench run` writes it); fix or remove it")
    if "schema" not in record:
        record = {**record, "schema": 0}
        if "tracking_run_id" not in record:  # schema 0 named the tracked run after MLflow
            record["tracking_run_id"] = record.pop("mlflow_run_id", None)
    record["_path"] = str(path)
    return record


def record_order(record: dict[str, Any]) -> tuple[str, str]:
    """The order of result records, the one sort key: oldest first, runs finished in the same second by their
    tracked run's id."""
    return record["time"], record["tracking_run_id"] or ""


def load_records(root: Optional[Path] = None, dataset: Optional[str] = None) -> list[dict[str, Any]]:
    """Every record under `root` (default: results/), of one dataset or all."""
    root = root or results_dir()
    pattern = f"{dataset}/*/*.json" if dataset else "*/*/*.json"
    return [read_record(path) for path in sorted(root.glob(pattern)) if not path.name.startswith(".")]


# --- bench speed's records -----------------------------------------------------------------------


def speed_dir() -> Path:
    """results/speed/: the folder of every `bench speed` record (results/speed/<device>/<row>/<stamp>.json)."""
    return results_dir() / SPEED


def local_speed_dir() -> Path:
    """runs/speed/: a CPU's `bench speed` records, this machine's figures, kept out of git and of benchmark.md's
    inference column (`bench speed --keep-record` files them under speed_dir)."""
    return runs_dir() / SPEED


# The fields every mode's entry holds (harness.engine.benchmark.timing_fields), with their JSON types; each mode adds
# its own (flops_per_image, workers, providers, ...), kept as measured.
NUMBER = (int, float)
MODE_FIELDS: dict[str, tuple[tuple[type, ...], bool]] = {  # name -> (types, may be null)
    "batch": ((int,), False), "size": ((list,), False), "images_per_s": (NUMBER, True),
    "step_s": (NUMBER, True), "peak_memory_gib": (NUMBER, True)}


@dataclass(frozen=True)
class SpeedRecord:
    """What `bench speed` measured of one row on one device: `modes` maps each mode timed ("train", "infer",
    "eval", "data", ...) to its figures (MODE_FIELDS and the mode's own)."""

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

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        del data["path"]
        return {"kind": SPEED, **data}


# name -> (types, may be null); bool is not a number here
SPEED_FIELDS: dict[str, tuple[tuple[type, ...], bool]] = {
    "row": ((str,), False), "device": ((str,), False), "device_type": ((str,), False),
    "device_memory_gib": (NUMBER, True), "precision": ((str,), False), "compile": ((bool,), False),
    "channels_last": ((bool,), False), "fused": ((bool,), False), "cpu_threads": ((int,), False),
    "matmul_peak_tflops": (NUMBER, True),
    "matmul_peak_dtype": ((str,), True), "warmup": ((int,), False), "repeats": ((int,), False),
    "steps": ((int,), False), "modes": ((dict,), False), "git_commit": ((str,), False),
    "versions": ((dict,), False), "time": ((str,), False), "schema": ((int,), False)}


def _checked(data: dict[str, Any], name: str, rule: tuple[tuple[type, ...], bool], where: str) -> Any:
    """data[name] if it is of the rule's type, else a one-line error naming the file and the field."""
    types, nullable = rule
    if name not in data:
        raise BenchError(f"{where}: field {name!r} is missing; remove the file, or measure again with `bench speed`")
    value = data[name]
    if value is None and nullable:
        return None
    if isinstance(value, bool) and bool not in types or not isinstance(value, types):
        expected = " or ".join(t.__name__ for t in types) + (" or null" if nullable else "")
        raise BenchError(f"{where}: field {name!r} is {json.dumps(value)[:40]} ({type(value).__name__}), not "
                         f"{expected}; remove the file, or measure again with `bench speed`")
    return value


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
    values = {name: _checked(data, name, rule, where) for name, rule in SPEED_FIELDS.items()}
    for mode, entry in values["modes"].items():
        if not isinstance(entry, dict):
            raise BenchError(f"{where}: field 'modes.{mode}' is {type(entry).__name__}, not object; remove the file, "
                             "or measure again with `bench speed`")
        for name, rule in MODE_FIELDS.items():
            _checked(entry, name, rule, f"{where}: modes.{mode}")
        size = entry["size"]
        if len(size) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in size):
            raise BenchError(f"{where}: field 'modes.{mode}.size' is {json.dumps(size)[:40]}, not [width, height]; "
                             "remove the file, or measure again with `bench speed`")
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
    data = record.to_json()
    written = write_record(data, root=speed_dir() if kept else local_speed_dir(), group=record.device)
    return SpeedRecord(**{**asdict(record), "path": str(written)})
