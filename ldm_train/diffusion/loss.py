"""The diffusion training loss: noise the clean latents at random timesteps, regress the target."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.training_utils import compute_snr

from ldm_train.errors import UserError


def sample_noise(
    shape: torch.Size, generator: torch.Generator, device: torch.device, offset_noise: float = 0.0
) -> torch.Tensor:
    """Gaussian noise; with offset_noise > 0 plus a per-channel constant of that std, which lets the
    model change an image's mean brightness (Guttenberg 2023, "Diffusion with offset noise")."""
    noise = torch.randn(shape, generator=generator, device=device)
    if offset_noise:
        offset = torch.randn(shape[:2], generator=generator, device=device)
        noise = noise + offset_noise * offset[:, :, None, None]
    return noise


def diffusion_target(
    scheduler: SchedulerMixin, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor
) -> torch.Tensor:
    """What the U-Net learns to predict: the noise (epsilon) or the velocity (v_prediction)."""
    if scheduler.config.prediction_type == "v_prediction":
        return scheduler.get_velocity(x0, noise, t)
    return noise


def min_snr_weights(scheduler: SchedulerMixin, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023), as diffusers' train_text_to_image.py computes
    them, except that a zero SNR (zero-terminal-SNR schedules) gets weight 1, the limit of
    min(snr, gamma) / snr, instead of 0 / 0."""
    snr = compute_snr(scheduler, t)
    clipped = torch.minimum(snr, torch.full_like(snr, gamma))
    if scheduler.config.prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return torch.where(snr > 0, clipped / snr.clamp_min(1e-12), torch.ones_like(snr))


def diffusion_loss(
    predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    scheduler: SchedulerMixin,
    x0: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    snr_gamma: float | None = None,
) -> dict[str, torch.Tensor]:
    """{"mse": per-sample MSE between predict(x_t, t) and the target, min-SNR weighted if asked}."""
    x_t = scheduler.add_noise(x0, noise, t)
    target = diffusion_target(scheduler, x0, noise, t)
    prediction = predict(x_t, t)
    per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(
        dim=tuple(range(1, x0.ndim))
    )
    if snr_gamma is not None:
        per_sample = per_sample * min_snr_weights(scheduler, t, snr_gamma)
    return {"mse": per_sample.mean()}


@dataclass(frozen=True)
class DiffusionObjective:
    """The training objective's options (config stage.module.loss): min-SNR-gamma weighting
    (snr_gamma, e.g. 5.0; None: plain MSE) and offset noise (e.g. 0.1; 0: none)."""

    snr_gamma: float | None = None
    offset_noise: float = 0.0

    def __post_init__(self) -> None:
        if self.snr_gamma is not None and self.snr_gamma <= 0:
            raise UserError(
                f"stage.module.loss.snr_gamma={self.snr_gamma}; need > 0 (or null: no weighting)"
            )
        if self.offset_noise < 0:
            raise UserError(f"stage.module.loss.offset_noise={self.offset_noise}; need >= 0")

    def draw(
        self, x0: torch.Tensor, num_timesteps: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(t, noise) for a batch: t ~ U{0 .. num_timesteps-1} per sample, then the noise."""
        t = torch.randint(0, num_timesteps, (len(x0),), generator=generator, device=x0.device)
        return t, sample_noise(x0.shape, generator, x0.device, self.offset_noise)

    def __call__(
        self,
        predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        scheduler: SchedulerMixin,
        x0: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        return diffusion_loss(predict, scheduler, x0, t, noise, self.snr_gamma)
