"""Starting weights: a backbone checkpoint (ImageNet weights a user brings) and a whole-model checkpoint.

Loading is loud: one line on stderr says how many of the model's tensors were filled, and anything that
would quietly leave the network at its random initialisation is refused with a BenchError instead:
a missing or unreadable file, a checkpoint none of whose names match, any matching name whose shape
differs, or matching names that hold less than half of the model's weights. Files are read with
`torch.load(..., weights_only=True)`; nothing in them is executed.

A checkpoint may be a raw state dict, `{"model": state_dict, ...}` (segbench's own training
checkpoints, which also carry "ema", "optimizer", ...), or `{"state_dict": state_dict, ...}`.
Relative paths are read from the project root, so specs can name `weights/...`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from harness.config.spec import Spec
from harness.config.starting_weights import LOADED, META, MISSING, OTHER, RANDOM
from harness.errors import BenchError
from harness.files import read_torch_file
from harness.models.provenance import CHECKSUM_OK, NO_CHECKSUM, UNREADABLE, FileCheck, check_file
from harness.paths import PROJECT_ROOT

log = logging.getLogger(__name__)

WRAPPER_KEYS = ("model", "state_dict")  # where a state dict sits inside a larger checkpoint, in order of preference
DDP_PREFIX = "module."
WEIGHTS_ENV = "SEGBENCH_WEIGHTS"  # where specs' weights/... files live, when not in the project root
MIN_COVERAGE = 0.5  # the share of a model's weights (by element count) a checkpoint must fill


def resolve_checkpoint_path(path: str | Path) -> Path:
    """An absolute path; a relative one is taken from the project root, where specs' `weights/...` live."""
    resolved = Path(path).expanduser()
    if resolved.is_absolute():
        return resolved
    if resolved.parts[:1] == ("weights",) and os.environ.get(WEIGHTS_ENV):
        return Path(os.environ[WEIGHTS_ENV]).expanduser().joinpath(*resolved.parts[1:])
    return PROJECT_ROOT / resolved


def weights_folder_problem() -> Optional[str]:
    """What is wrong with $SEGBENCH_WEIGHTS, in a phrase with its fix, when it names no folder (None: unset, or a
    folder): every weights/... file would otherwise be reported missing with no word of why."""
    folder = os.environ.get(WEIGHTS_ENV)
    if not folder or Path(folder).expanduser().is_dir():
        return None
    return (f"${WEIGHTS_ENV} names {folder}, which is not a folder; set it to the folder holding the weights files "
            f"(or unset it to read weights/ in the project root)")


def read_state_dict(path: Path, label: str, fix: str) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file, unwrapped from `{"model": ...}` / `{"state_dict": ...}`."""
    loaded: Any = read_torch_file(path, label, fix)
    if isinstance(loaded, Mapping):
        for key in WRAPPER_KEYS:
            if isinstance(loaded.get(key), Mapping):
                loaded = loaded[key]
                break
    if not isinstance(loaded, Mapping) or not loaded or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise BenchError(f"{label} {path} holds no state dict (expected a mapping of tensor names to tensors, "
                         f"or one under 'model' or 'state_dict')")
    state = dict(loaded)
    # A model saved from inside DistributedDataParallel carries this prefix on every name.
    if all(k.startswith(DDP_PREFIX) for k in state):
        state = {k[len(DDP_PREFIX):]: v for k, v in state.items()}
    return state


def match_names(own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], label: str, path: Path,
                num_classes: Optional[int] = None) -> tuple[list[str], list[str]]:
    """(names to copy, classifier names to re-initialise) of `state` into a module whose state dict is `own` (its
    shapes are all that is read: a meta-device model will do); every refusal of `load_matching` is raised here."""
    matched = [name for name in own if name in state]
    if not matched:
        example_model, example_ckpt = next(iter(own), "-"), next(iter(state), "-")
        raise BenchError(f"{label} {path}: none of its {len(state)} tensor names match the model "
                         f"(model has e.g. '{example_model}', checkpoint '{example_ckpt}'); "
                         "it is a checkpoint of another network")
    reinitialised = []
    for name in matched:
        theirs, mine = state[name].shape, own[name].shape
        if theirs == mine:
            continue
        if num_classes is not None and mine[:1] == (num_classes,) and theirs[1:] == mine[1:]:
            reinitialised.append(name)
            continue
        raise BenchError(f"{label} {path}: shape mismatch at '{name}': checkpoint {tuple(theirs)}, "
                         f"model {tuple(mine)}; it was trained for another network or number of classes")
    matched = [name for name in matched if name not in reinitialised]
    # A few shared names (a stem, a classifier) do not make a checkpoint of this network: a DFNet2 state dict
    # matches only DFNet1's stem. Refuse when most of the model's weights would stay at their initial values.
    filled = sum(own[name].numel() for name in matched)
    total = sum(t.numel() for t in own.values())
    if filled < MIN_COVERAGE * total:
        missing = next(name for name in own if name not in state)
        raise BenchError(f"{label} {path}: only {100 * filled / total:.0f}% of the model's weights are in it "
                         f"({len(matched)}/{len(own)} tensors match; e.g. '{missing}' is missing); "
                         f"it is a checkpoint of another network")
    return matched, reinitialised


def load_matching(module: nn.Module, state: Mapping[str, torch.Tensor], label: str, path: Path,
                  num_classes: Optional[int] = None) -> int:
    """Copy every tensor of `state` whose name is in `module`; returns how many were copied.

    Refuses when no name matches (the wrong kind of checkpoint), when any matching name has another
    shape (another network, or another number of classes), or when the matching names hold less than
    half of the model's weights (another network sharing a few names): all would otherwise train
    mostly from scratch while looking as if they had started from the checkpoint.

    With `num_classes`, a tensor whose only difference is its first dimension, `num_classes` in the model,
    is a classifier trained for another label set (MSeg's universal classes): it keeps its initial values
    and the one-line report names it, as UP's loader dropped shape-mismatched tensors.
    """
    own = module.state_dict()
    matched, reinitialised = match_names(own, state, label, path, num_classes)
    module.load_state_dict({name: state[name] for name in matched}, strict=False)
    notes = []
    if reinitialised:
        classes = state[reinitialised[0]].shape[0]
        notes.append(f"re-initialised for {num_classes} classes (the checkpoint has {classes}): "
                     f"{', '.join(reinitialised)}")
    kept = [name for name in own if name not in state]
    if kept:
        notes.append(f"{len(kept)} keep their initial values, e.g. '{kept[0]}'")
    if len(state) > len(matched) + len(reinitialised):
        notes.append(f"{len(state) - len(matched) - len(reinitialised)} checkpoint tensors unused")
    log.info("%s %s: loaded %d/%d tensors%s", label, path, len(matched), len(own),
             f" ({'; '.join(notes)})" if notes else "")
    return len(matched)


def load_init_checkpoint(model: nn.Module, path: str | Path, num_classes: int = 19) -> int:
    """Start the whole model from a checkpoint (e.g. the MSeg-pretrained DF-Seg, or an earlier segbench run);
    a classifier for another number of classes is re-initialised."""
    resolved = resolve_checkpoint_path(path)
    fix = "put the checkpoint there, or pass --init-checkpoint PATH / set model.init_checkpoint in the spec"
    return load_matching(model, read_state_dict(resolved, "init_checkpoint", fix), "init_checkpoint", resolved,
                         num_classes=num_classes)


def load_backbone_checkpoint(model: nn.Module, path: str | Path, row: str) -> int:
    """Load ImageNet weights of the backbone, in the key layout of the file UP's config names, into
    `model.backbone`: the family's `convert_backbone_state` maps the file's names to ours."""
    resolved = resolve_checkpoint_path(path)
    backbone = getattr(model, "backbone", None)
    if not isinstance(backbone, nn.Module):
        raise BenchError(f"row '{row}': model.backbone_checkpoint is set, but this family's model has no "
                         f"`backbone` module to load it into; remove model.backbone_checkpoint from the spec")
    fix = "put the backbone's state dict there, or correct model.backbone_checkpoint in the spec"
    state = read_state_dict(resolved, "backbone_checkpoint", fix)
    convert = getattr(model, "convert_backbone_state", None)
    if convert is not None:
        state = convert(state)
    return load_matching(backbone, state, "backbone_checkpoint", resolved)


def check_contents(spec: Spec, key: str, path: Path) -> None:
    """The file at `path` (the spec's `key`) loads with `weights_only` and its tensors fit the row's network by name
    and shape, as a run's loading would find; a BenchError says what does not. The network is built on the meta
    device (shapes only), so this costs the file's read, not a model's memory."""
    from harness.models.sizes import meta_model

    model = meta_model(spec)
    label = key.removeprefix("model.")
    fix = "bring it from the source `bench weights` shows"
    state = read_state_dict(path, label, fix)
    if key == "model.init_checkpoint":
        match_names(model.state_dict(), state, label, path, num_classes=19)
        return
    backbone = getattr(model, "backbone", None)
    if not isinstance(backbone, nn.Module):
        raise BenchError(f"row '{spec.row}': model.backbone_checkpoint is set, but this family's model has no "
                         f"`backbone` module to load it into; remove model.backbone_checkpoint from the spec")
    convert = getattr(model, "convert_backbone_state", None)
    match_names(backbone.state_dict(), convert(state) if convert is not None else state, label, path)


def verify_file(spec: Spec, key: str, path: Path) -> FileCheck:
    """`check_file` with its hash, and for a file without a published checksum its contents as far as they can be
    checked (`check_contents`): a truncated file or a pickled program is unusable, not "present"."""
    checked = check_file(path)
    if checked.status != NO_CHECKSUM:
        return checked
    try:
        check_contents(spec, key, path)
    except BenchError as exc:
        return dataclasses.replace(checked, status=UNREADABLE, reason=str(exc))
    return checked


def expected_files(spec: Spec) -> list[tuple[str, Path]]:
    """The starting-weight file a row starts from, as (spec key, resolved path): its whole-model checkpoint when
    it names one (every tensor it holds replaces the backbone's), else its backbone's ImageNet file."""
    if spec.model.init_checkpoint:
        return [("model.init_checkpoint", resolve_checkpoint_path(spec.model.init_checkpoint))]
    if spec.model.backbone_checkpoint:
        return [("model.backbone_checkpoint", resolve_checkpoint_path(spec.model.backbone_checkpoint))]
    return []


def checked_files(spec: Spec, contents: bool = False) -> list[tuple[Path, FileCheck]]:
    """Each starting-weight file the row expects, with what harness.models.provenance finds of it (present,
    published checksum; with `contents`, also a file without a published checksum loaded and matched by name and
    shape, as `verify_file` does): what `bench run`'s validation and `bench doctor` judge, each by its rule."""
    return [(path, verify_file(spec, key, path) if contents else check_file(path))
            for key, path in expected_files(spec)]


def apply_starting_weights(model: nn.Module, spec: Spec, loud: bool = False) -> str:
    """Fill `model` from the file the spec names (`expected_files`).

    Returns the run's starting-weights status for its record and MLflow tags: "random (none expected)",
    "loaded <file>" (with " (checksum ok)" where a checksum is published and matches), "other <file> (...)" (a
    published checksum that does not match: the run is recorded as other starting weights), or "missing <files>".
    A named file that is absent does not stop the run (users bring the files, and pipeline checks run without
    them), but with `loud` (a Cityscapes run) it prints a prominent warning: such a run is no reproduction of the
    row, and the table marks it.
    """
    if any(p.is_meta for p in model.parameters()):
        return META  # a meta-device model only measures shapes (harness.models.sizes); it has no storage to fill
    files = expected_files(spec)
    if not files:
        return RANDOM
    absent = [path for _, path in files if not path.is_file()]
    if absent:
        names = ", ".join(str(p) for p in absent)
        problem = weights_folder_problem()
        if problem:
            log.warning("warning: %s", problem)
        if loud:
            bar = "!" * 100
            log.warning(f"{bar}\nWARNING: row '{spec.row}' starts from {names}, which is not there: this run trains "
                        f"from random weights, unlike the table's, and is marked as such in the results and the "
                        f"table.\nPut the file there (`bench weights` lists every row's files) and start again.\n{bar}")
        else:
            log.info(f"note: {names} not found; {spec.row} starts from random weights (`bench weights` lists the "
                     "files)")
        return f"{MISSING} {names}"
    (key, path), = files
    if key == "model.init_checkpoint":
        load_init_checkpoint(model, path)
    else:
        load_backbone_checkpoint(model, path, spec.row)
    checked = check_file(path)
    if checked.mismatch:
        log.warning("warning: %s is not the file the row expects: %s; this run is recorded as other starting "
                    "weights and does not count (`bench weights --verify`)", path, checked.describe())
        return f"{OTHER} {path} ({checked.describe()})"
    return f"{LOADED} {path}" + (" (checksum ok)" if checked.status == CHECKSUM_OK else "")
