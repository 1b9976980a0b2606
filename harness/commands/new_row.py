"""`bench new-row`: write one of our rows, an smp architecture on an encoder with a table row's recipe.

The file inherits the recipe row and says only what differs: the smp family, architecture and encoder, the
columns' model and backbone names, no starting-weight files (the recipe row's files fit its own network, not this
one) and no auxiliary weights (smp has no pixel-level auxiliary output). It is loaded and checked before this
returns; a row that would not load or build is removed again and refused in one line.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Optional

import yaml

from harness.config.spec import is_table_row, load_spec
from harness.errors import BenchError
from harness.files import atomic_write_text
from harness.paths import experiments_dir

DEFAULT_RECIPE = "deeplabv3-r50"
ROW_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def canonical_arch(arch: str) -> str:
    """smp's class name for `arch`, matched without regard to case (`deeplabv3plus` -> DeepLabV3Plus); an unknown
    name is returned as given, for the spec check to refuse with the accepted names."""
    from harness.models.smp_family import architectures

    return next((name for name in architectures() if name.lower() == arch.lower()), arch)


def row_body(arch: str, encoder: str, source: str, root: Path) -> tuple[dict[str, Any], list[str]]:
    """What the new row changes in `source`'s resolved spec, and a note per inherited setting it drops."""
    recipe = load_spec(source, root)
    model: dict[str, Any] = {"family": "smp", "arch": arch, "encoder": encoder, "backbone": encoder,
                             "backbone_checkpoint": None}
    notes = []
    if recipe.model.init_checkpoint:
        model["init_checkpoint"] = None
    if recipe.model.kwargs and recipe.model.arch != arch:
        # Constructor keywords belong to one architecture: another one's would be refused, or mean something else.
        model["kwargs"] = None
        notes.append(f"dropped {source}'s model.kwargs ({', '.join(recipe.model.kwargs)}): they are "
                     f"{recipe.model.arch or recipe.model.family}'s constructor keywords, not {arch}'s; add {arch}'s "
                     "own under model.kwargs if you need any")
    body: dict[str, Any] = {"inherit": source, "columns": {"model": arch, "backbone": encoder}, "model": model}
    if recipe.loss.aux_weights:
        body["loss"] = {"aux_weights": []}
    return body, notes


def new_row(name: str, arch: str, encoder: str, source: str = DEFAULT_RECIPE) -> tuple[str, list[str]]:
    """`bench new-row`: (the line saying what was written and how to try it, a `note:` line per inherited setting
    the row drops)."""
    path, notes = write_row(name, arch, encoder, source)
    return f"wrote {path}; try it with: bench run --row {name} --synthetic", [f"note: {note}" for note in notes]


def write_row(name: str, arch: str, encoder: str, source: str = DEFAULT_RECIPE, root: Optional[Path] = None
              ) -> tuple[Path, list[str]]:
    """Write experiments/NAME.yaml after it loads and its network's settings check out; returns its path and notes
    on what it did not inherit."""
    import torch

    from harness.models import build_model

    root = root or experiments_dir()
    if not ROW_NAME.fullmatch(name):
        raise BenchError(f"row name {name!r}: use letters, digits, '-', '_' and '.', starting with a letter or digit")
    path = root / f"{name}.yaml"
    if path.exists():
        raise BenchError(f"{path} already exists; choose another NAME or edit that file")
    if is_table_row(name, root):
        raise BenchError(f"row name {name!r} is listed in {root / '_table.yaml'}; our rows need names the table does "
                         "not use")
    arch = canonical_arch(arch)
    body, notes = row_body(arch, encoder, source, root)
    header = (f"# Our row (not in the benchmark table), written by `bench new-row`: segmentation-models-pytorch's\n"
              f"# {arch} on encoder {encoder}, with {source}'s recipe. Starting weights: set "
              "model.backbone_checkpoint\n"
              f"# to the encoder's ImageNet state dict (nothing downloads); until then it trains from random weights.\n"
              "# Architecture keywords go under model.kwargs; a reference (reference: {miou: [..]}) adds Δ and "
              "verdict.\n")
    text = header + yaml.safe_dump(body, sort_keys=False, allow_unicode=True)
    staged = root / f".{name}.yaml.new"  # checked under a name no row lookup finds, then published
    try:
        atomic_write_text(staged, text)
    except OSError as exc:
        raise BenchError(f"cannot write {path} ({exc.strerror or exc}); make {root} writable, or copy experiments/ "
                         "somewhere writable and point SEGBENCH_EXPERIMENTS at it") from None
    try:
        os.link(staged, path)  # fails if NAME.yaml appeared meanwhile: never overwrite a row
        with torch.device("meta"):  # shapes only: checks the arch, encoder and keywords without allocating
            build_model(load_spec(name, root))
    except FileExistsError:
        raise BenchError(f"{path} already exists; choose another NAME or edit that file") from None
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    finally:
        staged.unlink(missing_ok=True)
    return path, notes
