"""EMA of the U-Net weights: Lightning's WeightAveraging callback (it swaps the average in for
validation, copies it into the model when training ends and keeps both in checkpoints), with the
decay warm-up of diffusers' EMAModel so that short runs are not dominated by their first steps."""

from __future__ import annotations

import functools

import torch
from lightning.pytorch.callbacks import WeightAveraging
from torch.optim.swa_utils import get_ema_multi_avg_fn


def warmup_decay(updates: int, max_decay: float) -> float:
    """diffusers EMAModel.get_decay without use_ema_warmup: (1 + n) / (10 + n), capped."""
    return min(max_decay, (1 + updates) / (10 + updates))


def ema_update(
    averaged: list[torch.Tensor],
    current: list[torch.Tensor],
    num_averaged: torch.Tensor,
    max_decay: float,
) -> None:
    decay = warmup_decay(int(num_averaged), max_decay)
    get_ema_multi_avg_fn(decay)(averaged, current, num_averaged)


class EMA(WeightAveraging):
    """Exponential moving average of the stage's trainable weights, updated after every step."""

    def __init__(self, decay: float = 0.999):
        # Lightning's EMAWeightAveraging has a fixed decay; this passes a warmed-up one instead.
        super().__init__(multi_avg_fn=functools.partial(ema_update, max_decay=decay))
        self.decay = decay
