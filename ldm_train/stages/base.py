"""What every stage shares: the optimizer and LR schedule partials of the optimizer and
lr_scheduler config groups, the speed switches (perf) on the trainable net, and the generator every
random draw of a training step comes from (so a resumed run repeats an uninterrupted one)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import lightning as L
import numpy as np
import torch

from ldm_train.perf import Perf

OptimizerFactory = Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]


def step_generator(device: torch.device, *key: int) -> torch.Generator:
    """A generator seeded from a key such as (seed, rank, global_step, batch_idx): every random draw
    of a step is reproducible, and different keys give unrelated streams (numpy's SeedSequence)."""
    seed = int(np.random.SeedSequence([abs(int(k)) for k in key]).generate_state(1, np.uint64)[0])
    return torch.Generator(device=device).manual_seed(seed & ((1 << 63) - 1))


class StageModule(L.LightningModule):
    """A stage gets ready-made parts (net, loss, optimizer partial, ...) and never reads config."""

    def __init__(
        self,
        optimizer: OptimizerFactory,
        lr_scheduler: SchedulerFactory | None = None,
        perf: Perf | None = None,
    ):
        super().__init__()
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        self.perf = perf or Perf()

    def trainable_parameters(self) -> Iterable[torch.nn.Parameter]:
        return (p for p in self.parameters() if p.requires_grad)

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.trainable_parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def export(self, out_dir: Path) -> Path | None:
        """Write what later stages and users load (e.g. a diffusers or open_clip folder) into
        out_dir and return it; None when the stage has nothing to export yet."""
        return None
