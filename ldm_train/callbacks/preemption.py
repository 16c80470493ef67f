"""Preemption: SIGTERM (and SIGUSR1) save a checkpoint and end the run cleanly, to be requeued."""

from __future__ import annotations

import logging
import signal
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException

log = logging.getLogger(__name__)


class PreemptionCheckpoint(L.Callback):
    """On SIGTERM Lightning finishes the current step and raises SIGTERMException; this saves
    last.ckpt there, so rerunning the command (resume=auto) goes on from that step. SIGUSR1 (what
    SLURM sends before the end of a job's time) does the same, except under SLURM with
    auto-requeue, where Lightning itself saves an hpc_ckpt and requeues the job."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning has installed its SIGTERM handler by now; SIGUSR1 gets the same one, unless
        # Lightning's SLURM auto-requeue took it already.
        if signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, None):
            signal.signal(signal.SIGUSR1, signal.getsignal(signal.SIGTERM))

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        checkpoint = trainer.checkpoint_callback
        if not isinstance(exception, SIGTERMException) or checkpoint is None:
            return
        path = (
            Path(checkpoint.dirpath)
            / f"{checkpoint.CHECKPOINT_NAME_LAST}{checkpoint.FILE_EXTENSION}"
        )
        trainer.save_checkpoint(path)
        log.info(
            "signal received: saved %s at step %d; rerun the command to resume",
            path,
            trainer.global_step,
        )
