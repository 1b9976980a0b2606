"""`bench show ROW`: the resolved spec of a row, every inherited default filled in."""

from __future__ import annotations

import yaml

from harness.config.spec import load_spec


def show(row: str) -> str:
    return yaml.safe_dump(load_spec(row).to_dict(), sort_keys=False)
