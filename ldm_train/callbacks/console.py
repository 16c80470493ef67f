"""The training console: one progress line for the whole run (StepProgressBar), and log lines for
the parameters and after each validation (RunReport).

    vae  step 1200/2400 |█████     | 05:10<05:10, 0.26s/step, loss 0.0412, val/psnr 28.1

Lightning's own bar counts batches per epoch ("Epoch 1/-2" with an endless stream cut into
epochs, and a version number); here the bar counts the global step against trainer.max_steps, so
its rate is the time per step and its remainder the time left (both across a resume: the bar
starts at the resumed step). Written to a terminal it redraws in place; written to a file (a
SLURM log) it writes a line every `file_interval_s` at most. Log lines while the bar runs are
printed above it (tqdm's logging redirect), not through it.
"""

from __future__ import annotations

import logging
import math
import sys
from contextlib import AbstractContextManager
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.model_summary import summarize
from tqdm.contrib.logging import logging_redirect_tqdm

log = logging.getLogger(__name__)

BAR_FORMAT = "{desc} {n_fmt}/{total_fmt} |{bar:12}| {elapsed}<{remaining}, {rate_fmt}{postfix}"


def short(value: Any) -> str:
    """A metric for the bar: 4 significant digits."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class StepProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar, counting global steps of the whole fit instead of an epoch's batches."""

    def __init__(self, file_interval_s: float = 30.0) -> None:
        super().__init__(leave=False)
        self.file_interval_s = file_interval_s
        self._redirect: AbstractContextManager | None = None

    def init_train_tqdm(self) -> Tqdm:
        trainer = self.trainer
        stage = type(trainer.lightning_module).__name__.removesuffix("Stage").lower()
        return Tqdm(
            desc=f"{stage}  step",
            total=trainer.max_steps if trainer.max_steps > 0 else None,
            initial=trainer.global_step,  # a resumed run: rate and time left from here on
            unit="step",
            disable=self.is_disabled,
            dynamic_ncols=True,
            file=sys.stdout,
            smoothing=0,  # the run's average: a validation's pause counts towards the time left
            mininterval=0.1 if sys.stdout.isatty() else self.file_interval_s,
            bar_format=BAR_FORMAT,
        )

    def init_validation_tqdm(self) -> Tqdm:
        return Tqdm(
            desc=self.validation_description,
            position=1,
            # to a file, the line RunReport logs after a validation says it all
            disable=self.is_disabled or not sys.stdout.isatty(),
            leave=False,
            dynamic_ncols=True,
            file=sys.stdout,
        )

    @property
    def validation_description(self) -> str:
        return "validating"

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.train_progress_bar = self.init_train_tqdm()
        if not self.train_progress_bar.disable:
            # Log lines go above the bar; Lightning's logger has a handler of its own.
            loggers = [logging.getLogger(), logging.getLogger("lightning.pytorch")]
            self._redirect = logging_redirect_tqdm(loggers)
            self._redirect.__enter__()

    def on_train_epoch_start(self, trainer: L.Trainer, *_: Any) -> None:
        pass  # one bar for the whole fit: epochs are the loader's business

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        bar = self.train_progress_bar
        bar.set_postfix_str(self.postfix(trainer, pl_module), refresh=False)
        bar.update(trainer.global_step - bar.n)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pass

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        bar = self.train_progress_bar
        bar.set_postfix_str(self.postfix(trainer, pl_module), refresh=False)
        bar.close()  # drawn once more, and left on the screen
        if self._redirect is not None:
            self._redirect.__exit__(None, None, None)
            self._redirect = None

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        pass  # one bar for the validation pass (Lightning's names each dataloader)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.val_progress_bar.close()
        self.reset_dataloader_idx_tracker()
        if not trainer.sanity_checking and self._train_progress_bar is not None:
            self.train_progress_bar.set_postfix_str(self.postfix(trainer, pl_module))

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        """What the module logs with prog_bar=True, without Lightning's version number, the
        "train/" prefix and a zero skipped-sample count."""
        items = {}
        for name, value in super().get_metrics(trainer, pl_module).items():
            if name == "v_num" or (name == "data/skipped" and not value):
                continue
            items[name.removeprefix("train/")] = value
        return items

    def postfix(self, trainer: L.Trainer, pl_module: L.LightningModule) -> str:
        return ", ".join(f"{k} {short(v)}" for k, v in self.get_metrics(trainer, pl_module).items())


class RunReport(L.Callback):
    """Log lines, with or without the bar: the parts that hold parameters at the start (instead of
    Lightning's model summary table, whose FLOPs column reads 0 without an example input and which
    lists every metric object), and every val/ figure after each validation."""

    @rank_zero_only
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        summary = summarize(pl_module, max_depth=1)
        parts = [
            f"{name} ({kind}) {human(count)}"
            for name, kind, count in zip(
                summary.layer_names, summary.layer_types, summary.param_nums, strict=True
            )
            if count
        ]
        frozen = summary.total_parameters - summary.trainable_parameters
        log.info(
            "parameters: %s trainable, %s frozen, %.1f MB: %s",
            human(summary.trainable_parameters),
            human(frozen),
            summary.model_size,
            "; ".join(parts) or "none",
        )

    @rank_zero_only
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        figures = {
            name: float(value)
            for name, value in sorted(trainer.callback_metrics.items())
            if name.startswith("val/") and value.numel() == 1
        }
        shown = ", ".join(f"{k} {short(v)}" for k, v in figures.items() if math.isfinite(v))
        if shown:
            log.info("validation at step %d: %s", trainer.global_step, shown)


def human(count: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return str(count)
