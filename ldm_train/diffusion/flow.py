"""Flow matching (rectified flow, as Stable Diffusion 3 and Flux train): the objective beside
epsilon and v-prediction (model.prediction_type=flow).

    sigma in [0, 1] per sample; x_t = (1 - sigma) * x0 + sigma * noise; target = noise - x0
    the network sees the timestep sigma * num_train_timesteps, as diffusers' flow pipelines give it

The training scheduler is diffusers' FlowMatchEulerDiscreteScheduler: its config holds the shift
(and the resolution-dependent shift's settings), and the sampling schedulers are built from it. The
formulas shared with diffusers are theirs: the timestep densities and loss weightings of
diffusers.training_utils (SD3's training script), the shift of the scheduler (`time_shift`), the
resolution-dependent `calculate_shift` of the SD3 / Flux pipelines; tests/test_flow.py checks the
interpolation and the shifted sigmas against the scheduler's own (scale_noise, set_timesteps).

Shift: sigma = shift * u / (1 + (shift - 1) * u), u the drawn time; shift > 1 spends more steps
(in training and sampling) at high noise, which larger images need: SD3 uses shift=3.0 at 1024 px
(its paper: shift ~ sqrt(pixels / 256^2), the same noise per image as at 256 px). With
use_dynamic_shifting the shift follows each batch's size (Flux): mu = calculate_shift(latent tokens,
base_image_seq_len, max_image_seq_len, base_shift, max_shift) and sigma = e^mu / (e^mu + 1/u - 1).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal, get_args

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling

from ldm_train.errors import UserError

TimestepSampling = Literal["uniform", "logit_normal", "mode"]
FlowWeighting = Literal["none", "sigma_sqrt", "cosmap"]
TIMESTEP_SAMPLINGS: tuple[str, ...] = get_args(TimestepSampling)
FLOW_WEIGHTINGS: tuple[str, ...] = get_args(FlowWeighting)


def build_flow_scheduler(
    num_train_timesteps: int = 1000,
    shift: float = 1.0,
    use_dynamic_shifting: bool = False,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
    base_image_seq_len: int = 256,
    max_image_seq_len: int = 4096,
) -> FlowMatchEulerDiscreteScheduler:
    """The flow objective's training scheduler, its options checked first."""
    key = "stage.module.noise_scheduler"
    if shift <= 0:
        raise UserError(f"{key}.shift={shift}; need > 0 (1: no shift)")
    if use_dynamic_shifting and not 0 < base_image_seq_len < max_image_seq_len:
        raise UserError(
            f"{key}.base_image_seq_len={base_image_seq_len}, max_image_seq_len="
            f"{max_image_seq_len}: need 0 < base < max (latent tokens of the smallest and largest "
            "image the shift is interpolated between)"
        )
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=num_train_timesteps,
        shift=shift,
        use_dynamic_shifting=use_dynamic_shifting,
        base_shift=base_shift,
        max_shift=max_shift,
        base_image_seq_len=base_image_seq_len,
        max_image_seq_len=max_image_seq_len,
    )


def is_flow(scheduler_or_config: Any) -> bool:
    """True for a flow-matching scheduler, or the config of one (no betas, a shift)."""
    config = getattr(scheduler_or_config, "config", scheduler_or_config)
    return "shift" in config and "beta_schedule" not in config


def image_seq_len(latent_shape: tuple[int, ...] | torch.Size, patch_size: int = 1) -> int:
    """Tokens of one latent (... x h x w) for a network of this patch size (1: a U-Net), as the SD3
    and Flux pipelines count them for the resolution-dependent shift."""
    height, width = latent_shape[-2:]
    return (int(height) // patch_size) * (int(width) // patch_size)


def shift_mu(config: Mapping, seq_len: int) -> float | None:
    """The resolution-dependent shift's mu (diffusers' calculate_shift) when the config has
    use_dynamic_shifting; None for the fixed `shift` (the scheduler applies it itself)."""
    if not config.get("use_dynamic_shifting"):
        return None
    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

    return calculate_shift(
        seq_len,
        config["base_image_seq_len"],
        config["max_image_seq_len"],
        config["base_shift"],
        config["max_shift"],
    )


def shifted_sigmas(
    scheduler: FlowMatchEulerDiscreteScheduler, u: torch.Tensor, seq_len: int
) -> torch.Tensor:
    """Times u in [0, 1] -> the sigmas the scheduler's shift makes of them (its time_shift; a fixed
    shift s is the exponential time shift with mu = ln s)."""
    mu = shift_mu(scheduler.config, seq_len)
    if mu is None:
        mu = math.log(scheduler.config.shift)
    return scheduler.time_shift(mu, 1.0, u)


def draw_sigmas(
    scheduler: FlowMatchEulerDiscreteScheduler,
    count: int,
    sampling: TimestepSampling,
    logit_mean: float,
    logit_std: float,
    mode_scale: float,
    seq_len: int,
    generator: torch.Generator,
    device: torch.device,
) -> torch.Tensor:
    """`count` training sigmas: u from the density of SD3's training (uniform, logit-normal,
    mode), then shifted."""
    u = compute_density_for_timestep_sampling(
        sampling, count, logit_mean, logit_std, mode_scale, device=device, generator=generator
    )
    return shifted_sigmas(scheduler, u, seq_len)


def interpolate(x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - sigma) x0 + sigma noise (FlowMatchEulerDiscreteScheduler.scale_noise)."""
    sigma = sigmas.reshape(-1, *[1] * (x0.ndim - 1)).to(x0.dtype)
    return (1 - sigma) * x0 + sigma * noise


def flow_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The velocity d x_t / d sigma = noise - x0: what the network learns to predict, and what
    the flow schedulers' step integrates (x_next = x_t + (sigma_next - sigma) * prediction)."""
    return noise - x0


def loss_weights(
    weighting: FlowWeighting, sigmas: torch.Tensor, num_timesteps: int
) -> torch.Tensor:
    """Per-sample loss weights of SD3's training (diffusers' compute_loss_weighting_for_sd3):
    none, sigma_sqrt (1 / sigma^2) or cosmap. The sigmas are held >= 1 / num_timesteps, the
    smallest of the scheduler's table, so that a draw at sigma ~ 0 cannot get an unbounded weight."""
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    return compute_loss_weighting_for_sd3(weighting, sigmas.clamp_min(1 / num_timesteps))
