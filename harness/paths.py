"""Where the project keeps its inputs and outputs; every location can be overridden by environment."""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def _env_path(name: str, default: Path) -> Path:
    value = os.environ.get(name)
    return Path(value).expanduser().resolve() if value else default


def experiments_dir() -> Path:
    return _env_path("SEGBENCH_EXPERIMENTS", PROJECT_ROOT / "experiments")


def results_dir() -> Path:
    return _env_path("SEGBENCH_RESULTS", PROJECT_ROOT / "results")


def benchmark_path() -> Path:
    return _env_path("SEGBENCH_BENCHMARK", PROJECT_ROOT / "benchmark.md")


def cache_dir() -> Path:
    """Generated data (the synthetic dataset) lives here, outside git."""
    return _env_path("SEGBENCH_CACHE", PROJECT_ROOT / ".cache")


def runs_dir() -> Path:
    """Per-run folders with checkpoints, outside git."""
    return _env_path("SEGBENCH_RUNS", PROJECT_ROOT / "runs")


def reference_dir() -> Path:
    """The reference material beside the checkout (UP's configs, the seed table): ../shared/reference in the
    project's own workspace; a user's clone has none, and whatever reads it says so."""
    return _env_path("SEGBENCH_REFERENCE", PROJECT_ROOT.parent / "shared" / "reference")


def default_tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{PROJECT_ROOT / 'mlflow.db'}"
