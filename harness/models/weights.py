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

import sys
from pathlib import Path
from typing import Any, Mapping

import timm
import torch
from torch import nn

from harness.checkpoint import read_torch_file
from harness.errors import BenchError
from harness.paths import PROJECT_ROOT
from harness.spec import Spec

WRAPPER_KEYS = ("model", "state_dict")  # where a state dict sits inside a larger checkpoint, in order of preference
DDP_PREFIX = "module."
MIN_COVERAGE = 0.5  # the share of a model's weights (by element count) a checkpoint must fill


def resolve_checkpoint_path(path: str | Path) -> Path:
    """An absolute path; a relative one is taken from the project root, where specs' `weights/...` live."""
    resolved = Path(path).expanduser()
    return resolved if resolved.is_absolute() else PROJECT_ROOT / resolved


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


def load_matching(module: nn.Module, state: Mapping[str, torch.Tensor], label: str, path: Path) -> int:
    """Copy every tensor of `state` whose name is in `module`; returns how many were copied.

    Refuses when no name matches (the wrong kind of checkpoint), when any matching name has another
    shape (another network, or another number of classes), or when the matching names hold less than
    half of the model's weights (another network sharing a few names): all would otherwise train
    mostly from scratch while looking as if they had started from the checkpoint.
    """
    own = module.state_dict()
    matched = [name for name in own if name in state]
    if not matched:
        example_model, example_ckpt = next(iter(own), "-"), next(iter(state), "-")
        raise BenchError(f"{label} {path}: none of its {len(state)} tensor names match the model "
                         f"(model has e.g. '{example_model}', checkpoint '{example_ckpt}'); it is a checkpoint of another network")
    for name in matched:
        if own[name].shape != state[name].shape:
            raise BenchError(f"{label} {path}: shape mismatch at '{name}': checkpoint {tuple(state[name].shape)}, "
                             f"model {tuple(own[name].shape)}; it was trained for another network or number of classes")
    # A few shared names (a stem, a classifier) do not make a checkpoint of this network: a DFNet2 state dict
    # matches only DFNet1's stem. Refuse when most of the model's weights would stay at their initial values.
    filled = sum(own[name].numel() for name in matched)
    total = sum(t.numel() for t in own.values())
    if filled < MIN_COVERAGE * total:
        missing = next(name for name in own if name not in state)
        raise BenchError(f"{label} {path}: only {100 * filled / total:.0f}% of the model's weights are in it "
                         f"({len(matched)}/{len(own)} tensors match; e.g. '{missing}' is missing); "
                         f"it is a checkpoint of another network")
    module.load_state_dict({name: state[name] for name in matched}, strict=False)
    notes = []
    if len(matched) < len(own):
        missing = next(name for name in own if name not in state)
        notes.append(f"{len(own) - len(matched)} keep their initial values, e.g. '{missing}'")
    if len(state) > len(matched):
        notes.append(f"{len(state) - len(matched)} checkpoint tensors unused")
    print(f"{label} {path}: loaded {len(matched)}/{len(own)} tensors" + (f" ({'; '.join(notes)})" if notes else ""),
          file=sys.stderr)
    return len(matched)


def load_init_checkpoint(model: nn.Module, path: str | Path) -> int:
    """Start the whole model from a checkpoint (e.g. the MSeg-pretrained DF-Seg, or an earlier segbench run)."""
    resolved = resolve_checkpoint_path(path)
    fix = "put the checkpoint there, or pass --init-checkpoint PATH / set model.init_checkpoint in the spec"
    return load_matching(model, read_state_dict(resolved, "init_checkpoint", fix), "init_checkpoint", resolved)


def loaded_through_timm(model: nn.Module, path: Path) -> bool:
    """Whether a builder already created one of `model`'s modules from `path` with `timm_pretrained`."""
    for module in model.modules():
        cfg = getattr(module, "pretrained_cfg", None) or {}
        if cfg.get("file") and Path(cfg["file"]) == path:
            return True
    return False


def load_backbone_checkpoint(model: nn.Module, path: str | Path, row: str) -> int:
    """Load a plain state dict of the backbone (e.g. DFNet ImageNet weights) into `model.backbone`."""
    resolved = resolve_checkpoint_path(path)
    if loaded_through_timm(model, resolved):
        return -1  # timm loaded it strictly, and reported it
    backbone = getattr(model, "backbone", None)
    if not isinstance(backbone, nn.Module):
        raise BenchError(f"row '{row}': model.backbone_checkpoint is set, but this family's model has no "
                         f"`backbone` module to load it into; remove model.backbone_checkpoint from the spec")
    fix = "put the backbone's state dict there, or correct model.backbone_checkpoint in the spec"
    return load_matching(backbone, read_state_dict(resolved, "backbone_checkpoint", fix), "backbone_checkpoint", resolved)


def timm_pretrained(name: str, checkpoint: str | Path, **kwargs: Any) -> nn.Module:
    """`timm.create_model(name, **kwargs)` with its weights from a file, through timm's pretrained config.

    timm reads the file itself (weights_only, its own key filtering and classifier removal) and loads
    strictly, so a mismatch fails here with timm's first complaint on one line. The timm-based families
    build their backbone with this (harness.models.common.timm_backbone) when `model.backbone_checkpoint`
    is set; `build_model` then sees the file in the module's `pretrained_cfg` and does not load it again.
    """
    path = resolve_checkpoint_path(checkpoint)
    if not path.is_file():
        raise BenchError(f"backbone_checkpoint {path} does not exist; put the backbone's weights there, or correct model.backbone_checkpoint in the spec")
    try:
        backbone = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs)
    except RuntimeError as exc:
        details = [line.strip() for line in str(exc).splitlines() if line.strip()]
        reason = next((line for line in details if line.startswith(("size mismatch", "Missing key", "Unexpected key"))),
                      details[0] if details else type(exc).__name__)
        raise BenchError(f"backbone_checkpoint {path} does not fit timm's {name}: {reason[:300]}") from None
    except Exception as exc:  # unreadable file: timm's torch.load failed
        raise BenchError(f"backbone_checkpoint {path} is unreadable by timm ({type(exc).__name__}); it may be truncated or not a {name} checkpoint") from None
    total = len(backbone.state_dict())
    print(f"backbone_checkpoint {path}: loaded {total}/{total} tensors through timm ({name})", file=sys.stderr)
    return backbone


def apply_starting_weights(model: nn.Module, spec: Spec) -> None:
    """The spec's backbone checkpoint, then its whole-model checkpoint (which, when both are set, wins)."""
    if any(p.is_meta for p in model.parameters()):
        return  # a meta-device model only measures shapes (harness.models.sizes); it has no storage to fill
    if spec.model.backbone_checkpoint:
        load_backbone_checkpoint(model, spec.model.backbone_checkpoint, spec.row)
    if spec.model.init_checkpoint:
        load_init_checkpoint(model, spec.model.init_checkpoint)
