"""United-Perception's exponential moving average of the weights (up/utils/model/ema_helper.py, ExpEMA)."""

from __future__ import annotations

import math
from typing import Optional

import torch
from timm.utils import ModelEmaV3
from torch import nn


class ExpEMA(ModelEmaV3):
    """decay x (1 - exp(-step / ramp)) at 0-based step, over every floating-point tensor of the state dict
    (batch-norm statistics included); ramp 0 keeps the decay constant.

    Integer tensors (batch norm's `num_batches_tracked`) keep the values they had when the EMA was made, as UP's
    ExpEMA leaves them (`if v.dtype.is_floating_point`); timm's ModelEmaV3 would copy the model's."""

    def __init__(self, model: nn.Module, decay: float, ramp: float):
        super().__init__(model, decay=decay, exclude_buffers=False)
        self.ramp = ramp

    def get_decay(self, step: Optional[int] = None) -> float:
        if step is None or not self.ramp:
            return self.decay
        return self.decay * (1 - math.exp(-step / self.ramp))

    @torch.no_grad()
    def apply_update_(self, model: nn.Module, decay: float) -> None:
        pairs = [(ema_v, model_v) for ema_v, model_v in zip(self.module.state_dict().values(),
                                                               model.state_dict().values())
                 if ema_v.is_floating_point()]
        ema_values = [ema_v for ema_v, _ in pairs]
        model_values = [model_v.to(device=ema_v.device) for ema_v, model_v in pairs]
        if self.foreach:
            self._foreach_lerp_(ema_values, model_values, weight=1.0 - decay)
        else:
            for ema_v, model_v in zip(ema_values, model_values):
                self._lerp_(ema_v, model_v, weight=1.0 - decay)
