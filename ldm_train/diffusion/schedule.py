"""Noise schedules: the training scheduler (add_noise, get_velocity; for flow matching diffusers'
FlowMatchEulerDiscreteScheduler, ldm_train.diffusion.flow) and the sampling schedulers built from
its config, all diffusers classes; options are checked with one-line errors."""

from __future__ import annotations

import logging
from typing import Any, Literal, get_args

from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from ldm_train.diffusion.flow import build_flow_scheduler, is_flow
from ldm_train.errors import UserError, check_choice

log = logging.getLogger(__name__)

PredictionType = Literal["epsilon", "v_prediction", "flow"]
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
# A flow model's samplers (the velocity integrated from sigma 1 to 0): Euler and Heun from the
# training scheduler's config; DPM-Solver++ (2M) with flow sigmas and the same shift.
FLOW_SAMPLERS: dict[str, type[SchedulerMixin]] = {
    "euler": FlowMatchEulerDiscreteScheduler,
    "heun": FlowMatchHeunDiscreteScheduler,
    "dpmpp": DPMSolverMultistepScheduler,
}
ALL_SAMPLERS: tuple[str, ...] = tuple(dict.fromkeys([*SAMPLERS, *FLOW_SAMPLERS]))
# The sampler of an export or a validation that names none (sampler: null).
DEFAULT_SAMPLER = {False: "ddim", True: "euler"}  # by is_flow


def build_noise_scheduler(
    name: str = "ddpm",
    num_train_timesteps: int = 1000,
    beta_schedule: str = "scaled_linear",
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
    prediction_type: str = "epsilon",
    rescale_betas_zero_snr: bool = False,
    **flow: Any,
) -> SchedulerMixin:
    """The training noise scheduler (a diffusers class), with its options checked first.

    rescale_betas_zero_snr: the last timestep is pure noise (Lin et al. 2023, "Common Diffusion Noise
    Schedules and Sample Steps are Flawed"); pair it with prediction_type=v_prediction.
    prediction_type=flow: FlowMatchEulerDiscreteScheduler with the `flow` options (shift and the
    resolution-dependent shift: ldm_train.diffusion.flow.build_flow_scheduler); name and the betas
    are those of epsilon and v_prediction, and not used.
    """
    check_choice("stage.module.noise_scheduler.prediction_type", prediction_type, PREDICTION_TYPES)
    if prediction_type == "flow":
        return build_flow_scheduler(num_train_timesteps, **flow)
    check_choice("stage.module.noise_scheduler.name", name, TRAIN_SCHEDULERS)
    check_choice("stage.module.noise_scheduler.beta_schedule", beta_schedule, BETA_SCHEDULES)
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


def sampler_name(name: str | None, train_config: Any) -> str:
    """The sampler `name`, checked against the model's kind; None: that kind's default."""
    flow = is_flow(train_config)
    if name is None:
        return DEFAULT_SAMPLER[flow]
    check_choice("sampler", name, ALL_SAMPLERS)
    fitting = FLOW_SAMPLERS if flow else SAMPLERS
    if name not in fitting:
        kind = "a flow model" if flow else "an epsilon or v_prediction model"
        raise UserError(f"sampler={name} does not sample {kind}; it takes {' | '.join(fitting)}")
    if name == "heun" and train_config.get("use_dynamic_shifting"):
        raise UserError(
            "sampler=heun: diffusers' FlowMatchHeunDiscreteScheduler has no resolution-dependent "
            "shift (use_dynamic_shifting); use euler or dpmpp"
        )
    return name


def build_sampler(name: str | None, train_config: Any, pixel_space: bool = False) -> SchedulerMixin:
    """A fresh sampling scheduler of the kind `name` (None: the default for the model's kind) from
    the training scheduler's config (same betas, prediction_type and zero-SNR rescale; for flow the
    same shift). 'trailing' spacing starts sampling at the last training timestep, which
    zero-terminal-SNR schedules need and others do not mind."""
    name = sampler_name(name, train_config)
    if is_flow(train_config):
        return build_flow_sampler(name, train_config)
    options: dict[str, Any] = {"timestep_spacing": "trailing"}
    if name == "ddim":
        options["clip_sample"] = pixel_space  # images are in [-1, 1]; latents are not bounded
        options["set_alpha_to_one"] = True
    if name == "dpmpp":
        options |= {"algorithm_type": "dpmsolver++", "solver_order": 2}
        if train_config.get("rescale_betas_zero_snr"):
            options["final_sigmas_type"] = "zero"
    return SAMPLERS[name].from_config(train_config, **options)


def build_flow_sampler(name: str, train_config: Any) -> SchedulerMixin:
    """Euler / Heun: the flow schedulers of the training config. dpmpp: DPM-Solver++ (2M) on flow
    sigmas with the same shift (diffusers' use_flow_sigmas, prediction_type flow_prediction; with
    use_dynamic_shifting, set_timesteps(mu=...) sets its flow_shift to e^mu)."""
    if name == "euler":
        return FlowMatchEulerDiscreteScheduler.from_config(train_config)
    if name == "heun":  # its config has no resolution-dependent shift (sampler_name refuses it)
        steps, shift = train_config["num_train_timesteps"], train_config["shift"]
        return FlowMatchHeunDiscreteScheduler(num_train_timesteps=steps, shift=shift)
    return DPMSolverMultistepScheduler(
        num_train_timesteps=train_config["num_train_timesteps"],
        algorithm_type="dpmsolver++",
        solver_order=2,
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=train_config["shift"],
        use_dynamic_shifting=bool(train_config.get("use_dynamic_shifting")),
        final_sigmas_type="zero",
    )
