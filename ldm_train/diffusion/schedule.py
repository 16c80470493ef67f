"""Noise schedules: the training scheduler (add_noise, get_velocity) and the sampling schedulers
built from its config, both diffusers classes; options are checked with one-line errors."""

from __future__ import annotations

import logging
from typing import Any, Literal, get_args

from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from ldm_train.errors import UserError, check_choice

log = logging.getLogger(__name__)

PredictionType = Literal["epsilon", "v_prediction"]
BetaSchedule = Literal["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"]
PREDICTION_TYPES: tuple[str, ...] = get_args(PredictionType)
BETA_SCHEDULES: tuple[str, ...] = get_args(BetaSchedule)

# Training needs only add_noise / get_velocity / alphas_cumprod, which both share.
TRAIN_SCHEDULERS: dict[str, type[SchedulerMixin]] = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler}
# Deterministic samplers: an image depends only on its starting noise (its seed).
SAMPLERS: dict[str, type[SchedulerMixin]] = {
    "ddim": DDIMScheduler,
    "euler": EulerDiscreteScheduler,
    "dpmpp": DPMSolverMultistepScheduler,  # DPM-Solver++ (2M)
}


def build_noise_scheduler(
    name: str = "ddpm",
    num_train_timesteps: int = 1000,
    beta_schedule: str = "scaled_linear",
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
    prediction_type: str = "epsilon",
    rescale_betas_zero_snr: bool = False,
) -> SchedulerMixin:
    """The training noise scheduler (a diffusers class), with its options checked first.

    rescale_betas_zero_snr: the last timestep is pure noise (Lin et al. 2023, "Common Diffusion Noise
    Schedules and Sample Steps are Flawed"); pair it with prediction_type=v_prediction.
    """
    check_choice("stage.module.noise_scheduler.name", name, TRAIN_SCHEDULERS)
    check_choice("stage.module.noise_scheduler.beta_schedule", beta_schedule, BETA_SCHEDULES)
    check_choice("stage.module.noise_scheduler.prediction_type", prediction_type, PREDICTION_TYPES)
    if num_train_timesteps < 2:
        raise UserError(
            f"stage.module.noise_scheduler.num_train_timesteps={num_train_timesteps}; need >= 2"
        )
    if rescale_betas_zero_snr and prediction_type == "epsilon":
        # Legal (diffusers allows it) but the epsilon target is degenerate at zero SNR: say so.
        log.warning(
            "rescale_betas_zero_snr with prediction_type=epsilon: at the last timestep the input is "
            "pure noise, so the model cannot learn the image there; use v_prediction"
        )
    return TRAIN_SCHEDULERS[name](
        num_train_timesteps=num_train_timesteps,
        beta_schedule=beta_schedule,
        beta_start=beta_start,
        beta_end=beta_end,
        prediction_type=prediction_type,
        rescale_betas_zero_snr=rescale_betas_zero_snr,
        # Latents are not bounded to [-1, 1]; the sampler turns clipping on for pixel space only.
        clip_sample=False,
    )


def build_sampler(name: str, train_config: Any, pixel_space: bool = False) -> SchedulerMixin:
    """A fresh sampling scheduler of the kind `name` from the training scheduler's config
    (same betas, prediction_type and zero-SNR rescale). 'trailing' spacing starts sampling at the
    last training timestep, which zero-terminal-SNR schedules need and others do not mind."""
    check_choice("sampler", name, SAMPLERS)
    options: dict[str, Any] = {"timestep_spacing": "trailing"}
    if name == "ddim":
        options["clip_sample"] = pixel_space  # images are in [-1, 1]; latents are not bounded
        options["set_alpha_to_one"] = True
    if name == "dpmpp":
        options |= {"algorithm_type": "dpmsolver++", "solver_order": 2}
        if train_config.get("rescale_betas_zero_snr"):
            options["final_sigmas_type"] = "zero"
    return SAMPLERS[name].from_config(train_config, **options)
