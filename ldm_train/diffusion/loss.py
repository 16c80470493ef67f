"""The diffusion training loss: noise the clean latents at random timesteps, regress the target:
the noise (epsilon) or the velocity (v_prediction) of a DDPM schedule, or the flow-matching
velocity noise - x0 (flow: ldm_train.diffusion.flow)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_snr

from ldm_train.diffusion.flow import (
    FLOW_WEIGHTINGS,
    TIMESTEP_SAMPLINGS,
    FlowWeighting,
    TimestepSampling,
    draw_sigmas,
    flow_target,
    interpolate,
    is_flow,
    loss_weights,
)
from ldm_train.errors import UserError, check_choice

log = logging.getLogger(__name__)


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


def per_sample_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(prediction.float(), target.float(), reduction="none").mean(
        dim=tuple(range(1, target.ndim))
    )


def diffusion_loss(
    predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    scheduler: SchedulerMixin,
    x0: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    snr_gamma: float | None = None,
) -> dict[str, torch.Tensor]:
    """{"mse": per-sample MSE between predict(x_t, t) and the target, min-SNR weighted if asked}.
    A flow scheduler's t is sigma * num_train_timesteps (flow_loss)."""
    if is_flow(scheduler):
        return flow_loss(predict, scheduler, x0, t, noise)
    x_t = scheduler.add_noise(x0, noise, t)
    target = diffusion_target(scheduler, x0, noise, t)
    per_sample = per_sample_mse(predict(x_t, t), target)
    if snr_gamma is not None:
        per_sample = per_sample * min_snr_weights(scheduler, t, snr_gamma)
    return {"mse": per_sample.mean()}


def flow_loss(
    predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    scheduler: SchedulerMixin,
    x0: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    weighting: FlowWeighting = "none",
) -> dict[str, torch.Tensor]:
    """{"mse": per-sample MSE between predict(x_t, t) and noise - x0, weighted as asked}, at
    sigma = t / num_train_timesteps."""
    steps = scheduler.config.num_train_timesteps
    sigmas = t.float() / steps
    prediction = predict(interpolate(x0, noise, sigmas), t)
    per_sample = per_sample_mse(prediction, flow_target(x0, noise))
    if weighting != "none":
        per_sample = per_sample * loss_weights(weighting, sigmas, steps).to(per_sample.device)
    return {"mse": per_sample.mean()}


@dataclass(frozen=True)
class DiffusionObjective:
    """The training objective's options (config stage.module.loss): min-SNR-gamma weighting
    (snr_gamma, e.g. 5.0; None: plain MSE; epsilon and v_prediction), offset noise (e.g. 0.1; 0:
    none), how timesteps are drawn (timesteps: uniform, or SD3's logit_normal with logit_mean and
    logit_std, or mode with mode_scale) and flow's loss weighting (none | sigma_sqrt | cosmap)."""

    snr_gamma: float | None = None
    offset_noise: float = 0.0
    timesteps: TimestepSampling = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    weighting: FlowWeighting = "none"

    def __post_init__(self) -> None:
        if self.snr_gamma is not None and self.snr_gamma <= 0:
            raise UserError(
                f"stage.module.loss.snr_gamma={self.snr_gamma}; need > 0 (or null: no weighting)"
            )
        if self.offset_noise < 0:
            raise UserError(f"stage.module.loss.offset_noise={self.offset_noise}; need >= 0")
        check_choice("stage.module.loss.timesteps", self.timesteps, TIMESTEP_SAMPLINGS)
        check_choice("stage.module.loss.weighting", self.weighting, FLOW_WEIGHTINGS)
        if self.logit_std <= 0:
            raise UserError(f"stage.module.loss.logit_std={self.logit_std}; need > 0")

    def check(self, scheduler: SchedulerMixin) -> None:
        """The options that belong to one kind of objective, against the scheduler's kind."""
        if is_flow(scheduler):
            if self.snr_gamma is not None:
                log.warning(
                    "stage.module.loss.snr_gamma=%s is min-SNR weighting for epsilon and "
                    "v_prediction; prediction_type=flow does not use it (its weighting: "
                    "stage.module.loss.weighting)",
                    self.snr_gamma,
                )
        elif self.weighting != "none":
            raise UserError(
                f"stage.module.loss.weighting={self.weighting} weights the flow objective "
                "(model.prediction_type=flow); epsilon and v_prediction weight with snr_gamma"
            )

    def draw(
        self,
        x0: torch.Tensor,
        scheduler: SchedulerMixin,
        generator: torch.Generator,
        patch_size: int = 1,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(t, noise) for a batch, from the step's generator: t ~ U{0 .. T-1} (or SD3's densities
        over the same range) per sample; flow: t = sigma * T, sigma drawn and shifted for the
        batch's latent size (its tokens for a network of this patch size)."""
        steps = scheduler.config.num_train_timesteps
        device, count = x0.device, len(x0)
        if is_flow(scheduler):
            seq_len = (x0.shape[-2] // patch_size) * (x0.shape[-1] // patch_size)
            sigmas = draw_sigmas(
                scheduler, count, self.timesteps, self.logit_mean, self.logit_std,
                self.mode_scale, seq_len, generator, device,
            )  # fmt: skip
            t = sigmas * steps
        elif self.timesteps == "uniform":
            t = torch.randint(0, steps, (count,), generator=generator, device=device)
        else:
            u = compute_density_for_timestep_sampling(
                self.timesteps, count, self.logit_mean, self.logit_std, self.mode_scale,
                device=device, generator=generator,
            )  # fmt: skip
            t = (u * steps).long().clamp(0, steps - 1)
        return t, sample_noise(x0.shape, generator, device, self.offset_noise)

    def __call__(
        self,
        predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        scheduler: SchedulerMixin,
        x0: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        if is_flow(scheduler):
            return flow_loss(predict, scheduler, x0, t, noise, self.weighting)
        return diffusion_loss(predict, scheduler, x0, t, noise, self.snr_gamma)
