"""What the optimizer and lr_scheduler config groups build, where a library's callable does not fit
a config partial as it is. Every stage calls them the same way (StageModule.configure_optimizers):
optimizer(parameters or parameter groups), lr_scheduler(optimizer)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal, get_args

import torch
from diffusers.optimization import get_scheduler

from ldm_train.errors import UserError, check_choice

Schedule = Literal["constant", "linear", "cosine", "cosine_with_restarts", "polynomial"]
SCHEDULES: tuple[str, ...] = get_args(Schedule)
# diffusers' "constant" has no warmup; with a warmup it is "constant_with_warmup".
DIFFUSERS_NAMES = {"constant": "constant_with_warmup"}


def lr_schedule(
    optimizer: torch.optim.Optimizer,
    name: Schedule = "cosine",
    warmup_steps: int = 0,
    training_steps: int | None = None,
    num_cycles: int = 1,
    power: float = 1.0,
) -> torch.optim.lr_scheduler.LRScheduler:
    """diffusers' named schedule with a linear warmup. (get_scheduler takes the name first, so a
    config partial cannot pass the optimizer to it positionally: hence this wrapper.)
    num_cycles: hard restarts of cosine_with_restarts; power: of polynomial's decay."""
    check_choice("lr_scheduler.name", name, SCHEDULES)
    if warmup_steps < 0:
        raise UserError(f"lr_scheduler.warmup_steps={warmup_steps}; need >= 0")
    if name != "constant" and not (training_steps and training_steps > 0):
        raise UserError(
            f"lr_scheduler={name} decays to trainer.max_steps, which is {training_steps}: set "
            "trainer.max_steps, or use lr_scheduler=constant"
        )
    return get_scheduler(
        DIFFUSERS_NAMES.get(name, name),
        optimizer,
        num_warmup_steps=warmup_steps,
        num_training_steps=training_steps,
        num_cycles=num_cycles,
        power=power,
    )


def adamw8bit(params: Iterable[Any], **options: Any) -> torch.optim.Optimizer:
    """bitsandbytes' 8-bit AdamW (optimizer states in 8 bits: a quarter of AdamW's memory), an
    optional extra."""
    try:
        import bitsandbytes
    except ImportError:
        raise UserError(
            "optimizer=adamw8bit needs bitsandbytes: pip install 'ldm_train[bnb]' "
            "(in a checkout: pip install -e '.[bnb]')"
        ) from None
    return bitsandbytes.optim.AdamW8bit(params, **options)
