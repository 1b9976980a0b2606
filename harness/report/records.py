"""One JSON record per finished run under results/<dataset>/<row>/, written atomically, never overwritten; and the
environment a record names (commit, package versions)."""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Optional

from harness.errors import BenchError
from harness.files import check_writable, new_temporary_file
from harness.paths import PROJECT_ROOT, results_dir, runs_dir

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


def write_record(record: dict[str, Any], root: Optional[Path] = None) -> Path:
    """Publish `record` under a new name; an existing record is never replaced, and a failed write leaves
    nothing behind (not even a partial temporary file)."""
    root = root or results_dir()
    record = strict_json(record)
    folder = root / record["dataset"] / record["row"]
    stamp = record["time"].replace(":", "").replace("-", "")
    base = f"{stamp}-{str(record.get('mlflow_run_id') or 'norun')[:8]}"
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
    """One result record; a file that is not a JSON object is a one-line error naming it."""
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BenchError(f"result record {path} is unreadable ({exc}); fix or remove it") from None
    if not isinstance(record, dict):
        raise BenchError(f"result record {path} holds a JSON {type(record).__name__}, not an object (a record is "
                         "one JSON object, as `bench run` writes it); fix or remove it")
    record["_path"] = str(path)
    return record


def load_records(root: Optional[Path] = None, dataset: Optional[str] = None) -> list[dict[str, Any]]:
    """Every record under `root` (default: results/), of one dataset or all."""
    root = root or results_dir()
    pattern = f"{dataset}/*/*.json" if dataset else "*/*/*.json"
    return [read_record(path) for path in sorted(root.glob(pattern)) if not path.name.startswith(".")]
