"""Holding the U-Net stage's frozen upstream parts (the VAE: diffusion/latents.py; the text encoder:
diffusion/conditioning.py): a wrapper that keeps a frozen module out of the trained weights and
follows the stage's device, and a bounded cache of what they compute, by key."""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch

log = logging.getLogger(__name__)


class KeyedCache:
    """A bounded LRU of per-item tensors (a caption's hidden states, an image's latent Gaussian):
    lookup computes only the items it has not kept. The upstream parts are frozen, so a kept
    result is exactly what recomputing would give; size 0 keeps nothing."""

    def __init__(self, size: int = 0):
        self.size = size
        self.items: OrderedDict[str, torch.Tensor] = OrderedDict()

    def lookup(
        self, keys: Sequence[str], compute: Callable[[list[int]], torch.Tensor]
    ) -> torch.Tensor:
        """The items for keys, stacked; compute(indices into keys) gives the missing ones."""
        if self.size <= 0:
            return compute(list(range(len(keys))))
        first_index = {key: i for i, key in reversed(list(enumerate(keys)))}
        missing = [i for key, i in first_index.items() if key not in self.items]
        if missing:
            for i, item in zip(missing, compute(missing), strict=True):
                self.items[keys[i]] = item
        stacked = torch.stack([self.items[key] for key in keys])
        for key in keys:
            self.items.move_to_end(key)
        while len(self.items) > self.size:
            self.items.popitem(last=False)
        return stacked


class Frozen:
    """Holds a frozen upstream module outside the LightningModule's registered children, so it stays
    out of checkpoints, the optimizer, DDP and the EMA copy (deepcopy shares it, never copies it).
    It follows the stage's device when asked for (`on`)."""

    def __init__(self, module: torch.nn.Module | None):
        if module is not None:
            module.eval().requires_grad_(False)
        self.module = module

    def on(self, device: torch.device) -> torch.nn.Module | None:
        if self.module is not None:
            first = next(iter(self.module.parameters()), None)
            if first is not None and first.device != device:
                self.module.to(device)
        return self.module

    def __deepcopy__(self, memo: dict) -> Frozen:
        return self
