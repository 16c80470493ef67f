"""Lightning's ModelCheckpoint, plus last.ckpt at the end of training."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint


class StepCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that also writes last.ckpt when fit ends.

    Lightning's own on_train_end writes last.ckpt only if none was written during the run, so a
    600-step run with every_n_train_steps=500 would end with last.ckpt at step 500, and rerunning
    the command (resume=auto) would train steps 500-600 again. Here the end of fit always leaves
    last.ckpt at the final step (unless it was just written at that step).
    """

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
