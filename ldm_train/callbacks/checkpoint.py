"""Lightning's ModelCheckpoint, plus last.ckpt at the final training step."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn


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
        self._save_last_if_final(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A validation after the final step (e.g. at the epoch's end) may update what the stage
        # keeps from it (the VAE's measured latent scale): last.ckpt is written again, with it.
        # The EMA's average is swapped out again by now (it is copied in only at on_train_end).
        super().on_validation_end(trainer, pl_module)
        self._save_last_if_final(trainer, again=True)

    def _save_last_if_final(self, trainer: L.Trainer, again: bool = False) -> None:
        """again: also when this step was saved already (ModelCheckpoint's own check skips it)."""
        if not (self.save_last and 0 < trainer.max_steps <= trainer.global_step):
            return
        if again:
            skip = (
                bool(trainer.fast_dev_run)
                or trainer.state.fn != TrainerFn.FITTING
                or trainer.sanity_checking
            )
        else:
            skip = self._should_skip_saving_checkpoint(trainer)
        if not skip:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
