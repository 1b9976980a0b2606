"""`model.family: smp`: any segmentation-models-pytorch architecture on any smp or timm (`tu-`) encoder, for rows
a team adds beside the table (see README, "Your own rows").

The spec names `model.arch` (an smp class: Unet, FPN, DeepLabV3Plus, ...), `model.encoder` (an smp encoder name, or
`tu-` + a timm model name) and `model.kwargs`, the architecture's constructor keywords (decoder widths,
`encoder_output_stride`, `encoder_depth`, ...), checked against the constructor's signature before anything is
built. `model.output_stride` is not used by this family: the architecture's own keywords set it.

Nothing downloads: the encoder is always built with `encoder_weights=None`; ImageNet weights come from the row's
`model.backbone_checkpoint`, loaded into the encoder by harness.models.weights like every table row's backbone.
The file may be the encoder's own state dict, or the plain torchvision / timm classifier of the same name: names are
matched after dropping the `model.` prefix smp's timm wrapper adds (and timm's `stages_3.` flattening).

smp's `aux_params` adds an image-level classification head (pooled features -> one vector of class scores per
image), not a segmentation output: the pixel loss cannot supervise it, so rows of this family keep
`loss.aux_weights` empty and the model returns `(main,)` in training.
"""

from __future__ import annotations

import difflib
import inspect
import re
from collections.abc import Mapping
from functools import lru_cache
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from harness.config.spec import Spec
from harness.errors import BenchError
from harness.models.registry import register

TIMM_PREFIX = "tu-"
# Constructor arguments segbench sets itself: the rest of the signature is what `model.kwargs` may give.
MIN_FEATURE_SIZE = {"PAN": 8}  # the least size of the encoder's deepest map an architecture can take
SET_BY_SEGBENCH = ("encoder_name", "encoder_weights", "classes", "aux_params", "activation", "in_channels")


def architectures() -> dict[str, type]:
    import segmentation_models_pytorch as smp

    return {cls.__name__: cls for cls in smp.MODEL_ARCHITECTURES_MAPPING.values()}


@lru_cache(maxsize=1)
def _smp_encoders() -> tuple[str, ...]:
    import segmentation_models_pytorch as smp

    return tuple(smp.encoders.get_encoder_names())


@lru_cache(maxsize=1)
def _timm_models() -> frozenset[str]:
    import timm

    return frozenset(timm.list_models())


def accepted_kwargs(cls: type[Any]) -> list[str]:
    """The constructor keywords a row may set for architecture `cls`."""
    params = inspect.signature(cls.__init__).parameters.values()
    return [p.name for p in params if p.name != "self" and p.name not in SET_BY_SEGBENCH
            and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def _close(name: str, names: list[str] | tuple[str, ...] | frozenset[str]) -> str:
    close = difflib.get_close_matches(name, list(names), n=3, cutoff=0.5)
    return f"; closest: {', '.join(close)}" if close else ""


def check_smp_spec(spec: Spec) -> type:
    """The architecture class, after checking arch, encoder, kwargs and aux weights; one line naming what is wrong."""
    m, where = spec.model, f"row '{spec.row}'"
    archs = architectures()
    if not m.arch or m.arch not in archs:
        raise BenchError(f"{where}: model.arch {m.arch!r} is not a segmentation-models-pytorch architecture"
                         f"{_close(m.arch or '', list(archs))}; accepted: {', '.join(archs)}")
    if not m.encoder:
        raise BenchError(f"{where}: model.encoder is not set; give an smp encoder name "
                         f"({', '.join(_smp_encoders()[:5])}, ...) or 'tu-' + a timm model name")
    if m.encoder.startswith(TIMM_PREFIX):
        timm_name = m.encoder[len(TIMM_PREFIX):]
        if timm_name not in _timm_models():
            raise BenchError(f"{where}: model.encoder {m.encoder!r}: '{timm_name}' is not a timm model"
                             f"{_close(timm_name, _timm_models())}; accepted: 'tu-' + one of timm.list_models() "
                             f"({len(_timm_models())} names), or an smp encoder: {', '.join(_smp_encoders())}")
    elif m.encoder not in _smp_encoders():
        raise BenchError(f"{where}: model.encoder {m.encoder!r} is not an smp encoder"
                         f"{_close(m.encoder, _smp_encoders())}; "
                         f"accepted: {', '.join(_smp_encoders())}, or 'tu-' + a timm model name (timm.list_models())")
    cls = archs[m.arch]
    accepted = accepted_kwargs(cls)
    for key in m.kwargs:
        if key not in accepted:
            why = " (segbench sets it)" if key in SET_BY_SEGBENCH else ""
            raise BenchError(f"{where}: model.kwargs.{key} is not a keyword of smp.{m.arch}{why}; "
                             f"accepted: {', '.join(accepted)}")
    if spec.loss.aux_weights:
        raise BenchError(f"{where}: loss.aux_weights is {spec.loss.aux_weights}, but smp's auxiliary head "
                         f"(aux_params) classifies whole images and the pixel loss cannot supervise it; "
                         f"set loss.aux_weights: [] for family smp")
    return cls


def _canonical(name: str) -> str:
    """A tensor name without wrapper prefixes and with timm's flattened `stages_3.` written `stages.3.`."""
    for prefix in ("module.", "backbone.", "encoder.", "model."):
        if name.startswith(prefix):
            name = name[len(prefix):]
    return re.sub(r"_(\d+)(?=\.)", r".\1", name)


class SmpSegmenter(nn.Module):
    """An smp model under segbench's model contract: eval returns the main logits at the input size for any size
    (padded up to a multiple of the encoder's output stride, then cropped back), train returns `(main,)`."""

    def __init__(self, net: nn.Module, min_feature_size: int = 1):
        super().__init__()
        self.net = net
        # PAN's feature pyramid attention pools its deepest map three more times (7x7, 5x5, 3x3 stride 2): it
        # needs that map at least 8 wide, so small inputs are padded up to 8 output strides.
        self.min_feature_size = min_feature_size

    @property
    def backbone(self) -> nn.Module:
        # What harness.models.weights.load_backbone_checkpoint fills; a property, so the encoder's tensors are
        # not listed twice in the state dict.
        return cast(nn.Module, self.net.encoder)

    def convert_backbone_state(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The file's tensors under the encoder's own names; names the encoder lacks pass through unchanged, so
        the loader reports them as unused (a classifier's `fc.*`) or refuses another network's file."""
        own: dict[str, list[str]] = {}
        for name in self.backbone.state_dict():
            own.setdefault(_canonical(name), []).append(name)
        converted = {}
        for name, tensor in state.items():
            targets = own.get(_canonical(name), [])
            converted[targets[0] if len(targets) == 1 else name] = tensor
        return converted

    def forward(self, x: torch.Tensor):
        height, width = x.shape[-2:]
        stride = cast(int, self.backbone.output_stride)
        least = stride * self.min_feature_size
        pad_h, pad_w = max(-height % stride, least - height), max(-width % stride, least - width)
        if pad_h or pad_w:
            # Zeros of the normalised image: the dataset's mean colour, as the table's models see at padded borders.
            x = F.pad(x, (0, pad_w, 0, pad_h))
        out = self.net(x)
        main = out[0] if isinstance(out, tuple) else out
        main = main[..., :height, :width]
        return main if not self.training else (main,)


@register("smp")
def build_smp(spec: Spec, num_classes: int) -> nn.Module:
    cls = check_smp_spec(spec)
    m = spec.model
    assert m.arch is not None  # check_smp_spec refuses a row without one
    try:
        net = cls(encoder_name=m.encoder, encoder_weights=None, classes=num_classes, **m.kwargs)
    except Exception as exc:  # smp and timm raise ValueError, KeyError, AssertionError, TypeError... for bad values
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise BenchError(f"row '{spec.row}': smp.{m.arch} on encoder '{m.encoder}' with model.kwargs "
                         f"{dict(m.kwargs)} cannot be built: {first}") from None
    return SmpSegmenter(net, MIN_FEATURE_SIZE.get(m.arch, 1))

