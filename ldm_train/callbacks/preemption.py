"""Preemption: SIGTERM (and SIGUSR1) save a checkpoint and end the run cleanly, to be requeued.

Loader workers ignore these signals (ldm_train/data/workers.py), so a signal sent to the whole
process group, as schedulers do, reaches only this process's handler.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException

from ldm_train.data.workers import kill_worker_processes

log = logging.getLogger(__name__)


class PreemptionCheckpoint(L.Callback):
    """On SIGTERM Lightning finishes the current step and raises SIGTERMException; this saves
    last.ckpt there, so rerunning the command (resume=auto) goes on from that step, and the
    process exits with code 0. SIGUSR1 (what SLURM sends before the end of a job's time) does the
    same, except under SLURM with auto-requeue, where Lightning itself saves an hpc_ckpt and
    requeues the job.

    When waiting for the step would gain nothing or never end, the process exits at once with
    code 128 + the signal's number, and a rerun goes on from the newest checkpoint on disk:
    - before any step has ended in this process (nothing new to save);
    - at a second signal (the sender insists);
    - when no step or validation batch ends within grace_s seconds, or 3 times the longest such
      wait seen so far if longer (e.g. a loader stuck on a hung shard, which would otherwise keep
      the process, and its memory, alive until the scheduler's SIGKILL).
    """

    def __init__(self, grace_s: float = 30.0) -> None:
        self.grace_s = grace_s
        self._pid = os.getpid()
        self._previous: Any = signal.SIG_DFL
        self._active = False
        self._trainer: L.Trainer | None = None
        self._signals = self._steps = 0
        self._last_progress = self._longest_wait = 0.0
        self._watchdog: threading.Timer | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Before Lightning installs its SIGTERM handler, which then calls this one after its own.
        # Lightning fetches the first batch before on_train_start: a loader stuck there must not
        # hold the signal.
        if stage != "fit" or threading.current_thread() is not threading.main_thread():
            return  # (Python takes signal handlers from the main thread only)
        self._pid, self._trainer, self._active = os.getpid(), trainer, True
        self._signals = self._steps = 0
        self._previous = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, self._on_signal)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_progress, self._longest_wait = time.monotonic(), 0.0
        if not self._active:
            return
        # From here on this handler alone: Lightning's also runs a collective (a broadcast from
        # rank 0) inside the handler and forwards the signal to the ranks it started, so with a
        # signal to the whole job (every rank gets it, the others once more) the ranks' collectives
        # no longer pair up and the run hangs. Setting the flag suffices: the training loop
        # broadcasts rank 0's flag before every step, and all ranks stop after the same one.
        signal.signal(signal.SIGTERM, self._on_signal)
        # SIGUSR1 too, unless Lightning's SLURM auto-requeue took it.
        if signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, None):
            signal.signal(signal.SIGUSR1, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if os.getpid() != self._pid:
            return  # a loader worker between its fork and its worker_init_fn
        if not self._active:  # after fit (Lightning restores this handler): the default action
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self._signals += 1
        name = signal.Signals(signum).name
        if self._signals > 1:
            self._exit_now(signum, f"a second {name}")
        if self._steps == 0:
            self._exit_now(signum, f"{name} before the first step ended (nothing new to save)")
        # What Lightning's handler does first (its flag ends the loop after the current step).
        self._trainer._signal_connector.received_sigterm = True
        grace = max(self.grace_s, 3 * self._longest_wait)
        log.info(
            "%s: saving a checkpoint after the current step (at most %.0f s away)", name, grace
        )
        why = f"{name} and no step ended within {grace:.0f} s"
        self._watchdog = threading.Timer(grace, self._exit_now, (signum, why))
        self._watchdog.daemon = True
        self._watchdog.start()

    def _exit_now(self, signum: int, why: str) -> None:
        log.error("%s: exiting without a checkpoint; rerun the command to resume", why)
        launcher = self._trainer.strategy.launcher if self._trainer is not None else None
        if launcher is not None:
            launcher.kill(signal.SIGKILL)  # the other ranks this process started
        kill_worker_processes()
        os._exit(128 + signum)  # now: not through Lightning's teardown, which waits for the loader

    def _progress(self, step: bool) -> None:
        now = time.monotonic()
        self._longest_wait = max(self._longest_wait, now - self._last_progress)
        self._last_progress = now
        self._steps += step
        self._stop_watchdog()  # after a signal: Lightning stops the loop right after this

    def _stop_watchdog(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self._progress(step=True)

    def on_validation_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self._progress(step=False)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._progress(step=False)  # after the stage's own epoch-end work (e.g. sample grids)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._stop_watchdog()
        if self._active:
            self._active = False
            signal.signal(signal.SIGTERM, self._previous)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._stop_watchdog()  # the loop has stopped: saving must not be cut short
        self._active = False  # (Lightning's teardown, next, reinstalls this handler)
        checkpoint = trainer.checkpoint_callback
        if not isinstance(exception, SIGTERMException) or checkpoint is None:
            return
        path = (
            Path(checkpoint.dirpath)
            / f"{checkpoint.CHECKPOINT_NAME_LAST}{checkpoint.FILE_EXTENSION}"
        )
        trainer.save_checkpoint(path, weights_only=False)  # the whole state, to resume from
        log.info(
            "signal received: saved %s at step %d; rerun the command to resume",
            path,
            trainer.global_step,
        )
