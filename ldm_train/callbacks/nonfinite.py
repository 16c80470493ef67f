"""Non-finite losses: the optimizer step is skipped and counted, too many in a row stop the run, and
a checkpoint never holds non-finite weights or NaN buffers."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

from ldm_train.errors import UserError


class NonFiniteLossError(UserError):
    """The loss stayed NaN/inf for max_nonfinite_steps steps in a row (printed as one line)."""


class NonFiniteWeightsError(UserError):
    """A checkpoint would have held NaN/inf weights; it is not written (printed as one line)."""


class NonFiniteLossGuard(L.Callback):
    """Skips the optimizer step of a NaN/inf loss, logs train/nonfinite_steps (the run's total, kept
    in checkpoints) and stops the run after `max_in_row` such steps in a row.

    Lightning has no such option (gradient clipping does not help once a loss is NaN, and
    `detect_anomaly` only raises). A callback rather than code in each stage: it sees every loss
    before its backward (on_before_backward) and every optimizer step before it happens
    (on_before_optimizer_step) in automatic and in manual optimization alike (the VAE's two
    optimizers), so no stage needs to do anything. Skipping drops the gradients: torch's optimizers
    leave a parameter without a gradient untouched (no update, no weight decay, no moment update).
    Returning None from training_step would also skip the step, but under DDP only on the rank whose
    loss is bad, and the other ranks would wait for its gradients forever; here the backward runs on
    every rank and the ranks agree on skipping (one all-reduce of a flag per step). The global step
    and the LR schedules still advance over a skipped step.

    The forward pass of a NaN batch also turns BatchNorm's running statistics into NaN for good
    (the tiny CLIP's ResNet tower, the VAE's discriminator), which would break every later
    validation and the export: the buffers (not the parameters, so this is cheap) are copied before
    each step and put back when the step is skipped.
    """

    def __init__(self, max_in_row: int = 10) -> None:
        if isinstance(max_in_row, bool) or not isinstance(max_in_row, int) or max_in_row < 1:
            raise UserError(
                f"max_nonfinite_steps={max_in_row!r} must be a whole number >= 1 (the steps with a "
                "non-finite loss in a row that stop the run)"
            )
        self.max_in_row = max_in_row
        self.skipped = 0  # optimizer steps skipped over the whole run (resumed runs go on counting)
        self.in_row = 0  # training steps in a row with a skipped optimizer step
        self._loss_bad: torch.Tensor | None = None  # any non-finite loss since the last step
        self._stepped = False  # an optimizer step was attempted in this batch
        self._skipped_now = False  # and skipped
        self._buffers: dict[str, torch.Tensor] | None = None  # as they were before the step

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._buffers is None:  # kept over batches that only accumulate gradients
            self._buffers = {n: b.detach().clone() for n, b in pl_module.named_buffers()}

    def on_before_backward(
        self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor
    ) -> None:
        # Kept as a tensor: no GPU sync here, one per optimizer step below.
        bad = ~torch.isfinite(loss.detach()).all()
        self._loss_bad = bad if self._loss_bad is None else self._loss_bad | bad

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        bad, self._loss_bad = self._loss_bad, None
        local = bool(bad) if bad is not None else False
        self._stepped = True
        # Any rank's bad loss skips the step on every rank: the replicas stay identical.
        if trainer.strategy.reduce_boolean_decision(local, all=False):
            optimizer.zero_grad(set_to_none=True)
            self._skipped_now = True

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self._stepped:  # batches that only accumulate gradients neither count nor reset
            if self._skipped_now:
                self.skipped += 1
                self.in_row += 1
                restore_buffers(pl_module, self._buffers or {})
            else:
                self.in_row = 0
            self._buffers = None
        self._stepped = self._skipped_now = False
        pl_module.log(
            "train/nonfinite_steps",
            float(self.skipped),
            on_step=True,
            on_epoch=False,
            batch_size=1,
        )
        if self.in_row >= self.max_in_row:
            raise NonFiniteLossError(
                f"the loss was NaN/inf for {self.in_row} steps in a row (up to step "
                f"{trainer.global_step}; their updates were skipped, the weights and checkpoints "
                "are from before them): lower model.lr, set "
                "trainer.gradient_clip_val, use trainer.precision=32-true or check the data; "
                "max_nonfinite_steps sets how many in a row are tolerated"
            )

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Runs before the file is written (and checkpoint files are replaced atomically), so
        # raising here leaves the previous checkpoint as it was.
        bad = nonfinite_tensors(pl_module, checkpoint.get("state_dict", {}))
        if bad:
            raise NonFiniteWeightsError(
                f"not saving a checkpoint at step {trainer.global_step}: {len(bad)} weight "
                f"tensor(s) hold NaN/inf (e.g. {bad[0]}); the checkpoints already written are "
                "kept: resume from one with a lower model.lr or trainer.gradient_clip_val"
            )

    def state_dict(self) -> dict[str, int]:
        return {"skipped": self.skipped, "in_row": self.in_row}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.skipped, self.in_row = state_dict["skipped"], state_dict["in_row"]


def restore_buffers(module: torch.nn.Module, saved: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, buffer in module.named_buffers():
            if name in saved:
                buffer.copy_(saved[name])


def nonfinite_tensors(module: torch.nn.Module, state_dict: dict[str, Any]) -> list[str]:
    """Names in state_dict of the parameters with a NaN or inf and of the other tensors (buffers,
    e.g. BatchNorm statistics) with a NaN; inf is left alone there (an attention mask may hold
    -inf on purpose)."""
    # FSDP's wrapper adds this to the names of the module's parameters, not to the state dict's.
    parameters = {n.replace("_fsdp_wrapped_module.", "") for n, _ in module.named_parameters()}

    def bad(name: str, tensor: torch.Tensor) -> bool:
        if name in parameters:
            return not bool(torch.isfinite(tensor).all())
        return bool(torch.isnan(tensor).any())

    return [
        name
        for name, tensor in state_dict.items()
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and bad(name, tensor)
    ]
