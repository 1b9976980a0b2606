"""Build a model from a spec. Each family module registers its builder here.

The contract every family keeps: in eval mode `forward(x)` returns the main logits at the input's
height and width; in train mode it returns a tuple `(main, *aux)` whose auxiliary logits may be at
any resolution (the loss upsamples them) and match `loss.aux_weights` one to one.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from harness.config.spec import Spec
from harness.errors import BenchError

Builder = Callable[[Spec, int], nn.Module]

# Every family the benchmark table needs, built or not, so an unbuilt one fails with a clear line.
TABLE_FAMILIES = ("deeplabv3", "df_seg", "sf_seg", "pspnet", "bisenet", "icnet", "unet")
_BUILDERS: dict[str, Builder] = {}


def register(family: str) -> Callable[[Builder], Builder]:
    def decorate(builder: Builder) -> Builder:
        _BUILDERS[family] = builder
        return builder

    return decorate


def check_implemented(spec: Spec) -> None:
    """Raise before any data is read if the row's family has no builder yet."""
    family = spec.model.family
    if family in _BUILDERS:
        return
    if family in TABLE_FAMILIES:
        raise BenchError(f"row '{spec.row}': model family '{family}' is not implemented yet; "
                         f"implemented: {', '.join(sorted(_BUILDERS))}")
    raise BenchError(f"row '{spec.row}': model.family '{family}' is unknown; use one of {', '.join(TABLE_FAMILIES)}")


def build_model(spec: Spec, num_classes: int = 19) -> nn.Module:
    """The row's network with its initial (random) weights; `harness.models.weights.apply_starting_weights`
    then fills it from the files the row names."""
    check_implemented(spec)
    return _BUILDERS[spec.model.family](spec, num_classes)


def implemented_families() -> list[str]:
    return sorted(_BUILDERS)
