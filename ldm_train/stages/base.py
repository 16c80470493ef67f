"""What every stage shares: the optimizer and LR schedule partials of the optimizer and
lr_scheduler config groups, and the speed switches (perf) on the trainable net."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import lightning as L
import torch

from ldm_train.perf import Perf

OptimizerFactory = Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]


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
