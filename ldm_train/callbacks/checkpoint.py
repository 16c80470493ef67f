"""Lightning's ModelCheckpoint, plus last.ckpt at the final training step; every checkpoint written
beside its target and renamed into place (AtomicCheckpointIO)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn

from ldm_train.atomic import written_beside
from ldm_train.checkpoints import STAGE_KEY


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's TorchCheckpointIO, but the file is written to a temporary file in the
    checkpoint's own folder and renamed (ldm_train.atomic.written_beside). Lightning's own save
    commits through fsspec's temporary file in the system's temp folder: where that is another
    filesystem the commit is a copy, and a full disk left half a last.ckpt. Here a failed write
    leaves the previous checkpoint as it was (and does not hold the whole file in memory first)."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO.save_checkpoint takes no storage_options")
        with written_beside(Path(path)) as temporary:
            torch.save(checkpoint, temporary)


class StepCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that also writes last.ckpt at the final step (trainer.max_steps).

    Lightning's own on_train_end writes last.ckpt only if none was written during the run, so a
    600-step run with every_n_train_steps=500 would end with last.ckpt at step 500, and rerunning
    the command (resume=auto) would train steps 500-600 again. The save is at the last step's
    batch end, where the step checkpoints are written, not in on_train_end: by then the EMA
    callback (Lightning's WeightAveraging) has copied the average into the model, and the
    checkpoint would go on training from the average.

    stage: recorded in every checkpoint the trainer writes (ldm_train.checkpoints.STAGE_KEY), so that a
    run refuses another stage's checkpoint in one line instead of failing inside load_state_dict.
    """

    def __init__(self, *args: Any, stage: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stage = stage

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        if self.stage is not None:
            checkpoint[STAGE_KEY] = self.stage

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
