"""A trained model back from a segbench checkpoint: the row's network with the checkpoint's raw or EMA weights,
on a device, with the plan it is evaluated by and the split's images (what `bench eval` and `bench predict` need)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from harness.config.benchmark import OFFICIAL_SPLIT_IMAGES, dataset_name
from harness.config.plan import TrainPlan, make_plan
from harness.config.precision import resolve_precision
from harness.config.spec import Spec, load_spec
from harness.data.cityscapes import Sample, find_samples
from harness.data.source import check_data_options, cityscapes_root, synthetic_root
from harness.engine import checkpoint
from harness.engine.device import pick_device
from harness.engine.distributed import World
from harness.engine.run_folder import resolve_latest
from harness.errors import BenchError
from harness.models import build_model, check_implemented

WEIGHTS = ("ema", "raw")


def load_weights(spec: Spec, path: Path, weights: str, state: dict[str, Any]) -> nn.Module:
    """The row's model with the raw or EMA weights of a segbench checkpoint's `state`, every tensor matched."""
    state_dict = state.get("model") if weights == "raw" else state.get("ema")
    if state_dict is None:
        raise BenchError(f"checkpoint {path} has no EMA weights (its row trained without EMA); use --weights raw")
    model = build_model(spec)  # every tensor comes from the checkpoint
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as exc:
        detail = next((line.strip() for line in str(exc).splitlines()[1:] if line.strip()), str(exc))
        raise BenchError(f"checkpoint {path} does not fit row {spec.row}: {detail}") from None
    return model


def load_trained(path: str | Path, row: Optional[str] = None, weights: Optional[str] = None
                 ) -> tuple[Spec, nn.Module, str]:
    """(spec, model on the CPU in eval mode, which weights) of a checkpoint; the row defaults to the checkpoint's
    own, the weights to EMA for an EMA row and raw otherwise."""
    spec, model, chosen, _ = load_trained_state(path, row, weights)
    return spec, model, chosen


def load_trained_state(path: str | Path, row: Optional[str] = None, weights: Optional[str] = None
                       ) -> tuple[Spec, nn.Module, str, dict[str, Any]]:
    """`load_trained`, and the checkpoint's whole state (its plan, iteration, starting weights)."""
    checkpoint_path = resolve_latest(Path(path).expanduser())
    state = checkpoint.load(checkpoint_path)  # a bad file fails before anything else is touched
    row = row or state.get("spec", {}).get("row")
    if not row:
        raise BenchError(f"checkpoint {checkpoint_path} does not name its row; pass --row")
    spec = load_spec(row)
    check_implemented(spec)
    chosen = weights or ("ema" if spec.columns.ema else "raw")
    if chosen not in WEIGHTS:
        raise BenchError(f"--weights {chosen}: use ema or raw")
    return spec, load_weights(spec, checkpoint_path, chosen, state).eval(), chosen, state


@dataclass
class LoadedCheckpoint:
    """What `bench eval` and `bench predict` both need: the row, the loaded model, the split's images."""

    spec: Spec
    plan: TrainPlan  # the evaluation's plan: the dataset's test size and test mode, the precision
    model: nn.Module
    device: torch.device
    path: Path
    weights: str
    samples: list[Sample]
    data_root: Path
    dataset: str


def load_for_evaluation(path: str, row: Optional[str], weights: Optional[str], synthetic: bool,
                        data_root: Optional[str], split: str, device: Optional[str], precision: Optional[str],
                        progress: bool = True) -> LoadedCheckpoint:
    check_data_options(synthetic, data_root)
    path = str(resolve_latest(Path(path).expanduser()))
    spec, model, chosen = load_trained(path, row, weights)
    torch_device = pick_device(device, World())
    resolved = resolve_precision(precision, torch_device.type)
    root = synthetic_root(progress) if synthetic else cityscapes_root(data_root)
    dataset = dataset_name(synthetic)
    samples = find_samples(root, split, require_labels=False)
    plan = make_plan(spec, dataset, OFFICIAL_SPLIT_IMAGES["train"], precision=resolved)
    return LoadedCheckpoint(spec, plan, model.to(torch_device), torch_device, Path(path).expanduser(), chosen,
                            samples, root, dataset)
