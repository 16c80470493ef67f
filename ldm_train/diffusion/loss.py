"""The diffusion training loss: noise the clean latents at random timesteps, regress the target."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.training_utils import compute_snr


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
