"""United-Perception's exponential moving average of the weights (up/utils/model/ema_helper.py, ExpEMA)."""

from __future__ import annotations

import math
from typing import Optional

from timm.utils import ModelEmaV3
from torch import nn


class ExpEMA(ModelEmaV3):
    """decay x (1 - exp(-step / ramp)) at 0-based step, over every floating-point tensor of the state dict
    (batch-norm statistics included); ramp 0 keeps the decay constant."""

    def __init__(self, model: nn.Module, decay: float, ramp: float):
        super().__init__(model, decay=decay, exclude_buffers=False)
        self.ramp = ramp

    def get_decay(self, step: Optional[int] = None) -> float:
        if step is None or not self.ramp:
            return self.decay
        return self.decay * (1 - math.exp(-step / self.ramp))
