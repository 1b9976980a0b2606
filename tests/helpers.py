"""Test helpers: a private copy of experiments/ with extra rows, and running `bench` as a user would."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from harness.paths import PROJECT_ROOT


def experiments_with(tmp_path: Path, rows: dict[str, dict]) -> Path:
    """Copy experiments/ under tmp_path and add `rows` (row id -> spec mapping) to it and its table."""
    root = tmp_path / "experiments"
    if not root.exists():
        shutil.copytree(PROJECT_ROOT / "experiments", root)
    table = yaml.safe_load((root / "_table.yaml").read_text())
    for row, body in rows.items():
        (root / f"{row}.yaml").write_text(yaml.safe_dump(body))
        if row not in table["rows"]:
            table["rows"].append(row)
    (root / "_table.yaml").write_text(yaml.safe_dump(table))
    return root


def bench(*args: str, env: dict | None = None, **popen) -> subprocess.Popen:
    """Start `bench ARGS` in a subprocess with the test's environment (outputs under tmp)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "harness.cli", *args], env=full_env, cwd=PROJECT_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)
