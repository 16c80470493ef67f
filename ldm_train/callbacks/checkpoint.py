"""Lightning's ModelCheckpoint, plus last.ckpt at the final training step."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint


class StepCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that also writes last.ckpt at the final step (trainer.max_steps).

    Lightning's own on_train_end writes last.ckpt only if none was written during the run, so a
    600-step run with every_n_train_steps=500 would end with last.ckpt at step 500, and rerunning
    the command (resume=auto) would train steps 500-600 again. The save is at the last step's
    batch end, where the step checkpoints are written, not in on_train_end: by then the EMA
    callback (Lightning's WeightAveraging) has copied the average into the model, and the
    checkpoint would go on training from the average.
    """

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        final = 0 < trainer.max_steps <= trainer.global_step
        if final and self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
