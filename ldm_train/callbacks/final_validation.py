"""Validate at the last step too, so that a run's final figures (and the VAE's latent scale, and
the last validation grid) are those of its final weights, whatever val_every_n_steps is."""

from __future__ import annotations

from typing import Any

import lightning as L


class ValidateAtEnd(L.Callback):
    """At trainer.max_steps, ask Lightning to stop: its loop then validates once more before the
    fit ends (as it does for early stopping), unless that step validates anyway."""

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        if 0 < trainer.max_steps <= trainer.global_step and trainer.enable_validation:
            trainer.should_stop = True
