"""Model sizes, measured rather than typed in: parameters, state bytes, and FLOPs counted by
`torch.utils.flop_counter` on one eval-mode forward at the row's test size (and a training step's).

The model is built on the meta device, so nothing is allocated or computed: a 2048x1024 forward of
a ResNet-50 network is counted in a fraction of a second. The counter counts a multiply-add as two
FLOPs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from harness.config.spec import Spec
from harness.models.registry import build_model, implemented_families


@dataclass(frozen=True)
class ModelSize:
    params: int  # every parameter, the training-only auxiliary heads included
    inference_params: int  # parameters of the modules an eval-mode forward runs
    flops: int  # one eval-mode forward of a 1x3xHxW input

    @property
    def gflops(self) -> float:
        return self.flops / 1e9


def measure(model: nn.Module, height: int, width: int) -> ModelSize:
    """Count `model`'s parameters and the FLOPs of one eval-mode forward at height x width."""
    device = next(model.parameters()).device
    ran: set[nn.Module] = set()
    hooks = [m.register_forward_hook(lambda module, args, out: ran.add(module)) for m in model.modules()]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, 3, height, width, device=device))
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    inference = sum(p.numel() for m in ran for p in m.parameters(recurse=False))
    return ModelSize(sum(p.numel() for p in model.parameters()), inference, counter.get_total_flops())


def measure_spec(spec: Spec, num_classes: int = 19) -> ModelSize:
    """The row's network at the row's test size (`columns.test_size`, [width, height])."""
    # Starting-weight files only change values, never shapes; the meta device has nowhere to load them.
    shapes_only = dataclasses.replace(
        spec, model=dataclasses.replace(spec.model, backbone_checkpoint=None, init_checkpoint=None))
    with torch.device("meta"):
        model = build_model(shapes_only, num_classes)
    width, height = spec.columns.test_size
    return measure(model, height, width)


def measure_rows(specs: list[Spec]) -> dict[str, ModelSize]:
    """Sizes of the rows whose family is built; rows sharing a network and test size are measured once."""
    built = set(implemented_families())
    cache: dict[tuple, ModelSize] = {}
    sizes = {}
    for spec in specs:
        if spec.model.family not in built:
            continue
        key = (spec.network_key, tuple(spec.columns.test_size))
        if key not in cache:
            cache[key] = measure_spec(spec)
        sizes[spec.row] = cache[key]
    return sizes


def meta_model(spec: Spec) -> nn.Module:
    """The row's network on the meta device (shapes only; starting-weight files change values, never shapes)."""
    shapes_only = dataclasses.replace(spec, model=dataclasses.replace(spec.model, backbone_checkpoint=None,
                                                                       init_checkpoint=None))
    with torch.device("meta"):
        return build_model(shapes_only, 19)


def inference_flops(spec: Spec, width: int, height: int) -> int:
    """One eval-mode forward of one image: the figure `bench list --sizes` reports at the test size."""
    return measure(meta_model(spec), height, width).flops


@dataclass(frozen=True)
class TrainingStep:
    flops: int  # forward and backward of one image
    saved_bytes: int  # fp32 activations autograd keeps from the forward for the backward, per image


def training_step(spec: Spec, width: int, height: int) -> TrainingStep:
    """Forward and backward of one image in train mode (auxiliary heads included), counted by the same
    torch.utils.flop_counter on the meta device; two images are pushed so batch norm sees a batch. The tensors
    autograd saves for the backward (parameters aside) are summed on the way: the activation memory of a step."""
    model = meta_model(spec).train()
    parameters = {id(p) for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if id(tensor) not in parameters:
            saved[id(tensor)] = tensor.numel() * tensor.element_size()
        return tensor

    images = torch.zeros(2, 3, height, width, device="meta")
    with FlopCounterMode(display=False) as counter, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        outputs = model(images)
        outputs = (outputs,) if isinstance(outputs, torch.Tensor) else outputs
        torch.stack([o.float().sum() for o in outputs]).sum().backward()
    return TrainingStep(counter.get_total_flops() // 2, sum(saved.values()) // 2)


def training_flops(spec: Spec, width: int, height: int) -> int:
    """Forward and backward of one image in train mode (`training_step`'s count)."""
    return training_step(spec, width, height).flops


def state_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of the state dict, bytes of the parameters) of a model, meta or not."""
    state = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return state, sum(p.numel() * p.element_size() for p in model.parameters())
