"""Flow matching (model.prediction_type=flow): the interpolation, the target and the shifted sigmas
equal diffusers' (FlowMatchEulerDiscreteScheduler, calculate_shift); the samplers integrate a case
with a known answer; the training draws and the options' one-line errors."""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

from ldm_train.diffusion.flow import (
    build_flow_scheduler,
    flow_target,
    interpolate,
    shifted_sigmas,
)
from ldm_train.diffusion.loss import DiffusionObjective, flow_loss
from ldm_train.diffusion.sampler import SamplingOptions, run_scheduler
from ldm_train.diffusion.schedule import build_noise_scheduler, build_sampler, sampler_name
from ldm_train.errors import UserError


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_interpolation_and_sigmas_equal_the_schedulers(shift):
    scheduler = build_flow_scheduler(shift=shift)
    assert isinstance(scheduler, FlowMatchEulerDiscreteScheduler)
    generator = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 6, 4, 3, 3, generator=generator)
    t = scheduler.timesteps[torch.tensor([0, 17, 500, 998, 999])]
    x0, noise = x0[:1].expand(5, -1, -1, -1), noise[:1].expand(5, -1, -1, -1)
    theirs = scheduler.scale_noise(x0, t, noise)
    torch.testing.assert_close(interpolate(x0, noise, t / 1000), theirs, atol=1e-6, rtol=0)
    # The shift of the table the scheduler was built with, as ours computes it from u.
    u = torch.linspace(1000, 1, 1000) / 1000
    torch.testing.assert_close(
        shifted_sigmas(scheduler, u, 64), scheduler.sigmas, atol=1e-6, rtol=0
    )


def test_resolution_dependent_shift_equals_diffusers():
    """use_dynamic_shifting: the sigmas of set_timesteps(mu=calculate_shift(tokens)), as the SD3 and
    Flux pipelines call it, are ours for that many tokens; more tokens, more noise."""
    scheduler = build_flow_scheduler(use_dynamic_shifting=True, base_image_seq_len=16)
    for tokens in (16, 64, 1024):
        mu = calculate_shift(tokens, 16, 4096, 0.5, 1.15)
        scheduler.set_timesteps(8, mu=mu)
        ours = shifted_sigmas(scheduler, torch.linspace(1, 1 / 1000, 8), tokens)
        torch.testing.assert_close(ours, scheduler.sigmas[:-1], atol=1e-6, rtol=0)
    u = torch.full((1,), 0.5)
    assert shifted_sigmas(scheduler, u, 1024) > shifted_sigmas(scheduler, u, 16)


def test_the_target_is_the_velocity_the_euler_step_integrates():
    """Stepping diffusers' scheduler with noise - x0 from x_t lands on the interpolation at the
    next sigma: target and interpolation are one flow."""
    scheduler = build_sampler("euler", build_flow_scheduler(shift=2.0).config)
    scheduler.set_timesteps(6)
    x0, noise = torch.randn(2, 3, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    for i, t in enumerate(scheduler.timesteps):
        x_t = interpolate(x0, noise, scheduler.sigmas[i].expand(3))
        stepped = scheduler.step(flow_target(x0, noise), t, x_t).prev_sample
        expected = interpolate(x0, noise, scheduler.sigmas[i + 1].expand(3))
        torch.testing.assert_close(stepped, expected, atol=1e-5, rtol=0)


def gaussian_velocity(mean: float, std: float):
    """E[noise - x0 | x_t] for data ~ N(mean, std^2) per value: the exact velocity field, whose
    flow maps the noise n at sigma 1 to mean + std * n at sigma 0."""

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        sigma = t.float() / 1000
        variance = (1 - sigma) ** 2 * std**2 + sigma**2
        covariance = sigma - (1 - sigma) * std**2
        return -mean + covariance / variance * (x - (1 - sigma) * mean)

    return velocity


@pytest.mark.parametrize(
    ("sampler", "steps", "tolerance"),
    [("euler", 50, 0.06), ("heun", 20, 0.01), ("dpmpp", 50, 0.02)],
)
def test_samplers_integrate_gaussian_data_to_its_exact_flow(sampler, steps, tolerance):
    """Our sampling loop (run_scheduler) with diffusers' flow schedulers, given the exact velocity
    of Gaussian data: each noise lands where the exact flow takes it; Euler errs in O(1/steps),
    the higher-order samplers less at fewer steps."""
    noise = torch.randn(512, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    config = dict(build_noise_scheduler(prediction_type="flow").config)

    def error(name: str, count: int) -> float:
        scheduler = build_sampler(name, config)
        scheduler.set_timesteps(count)
        x = run_scheduler(scheduler, gaussian_velocity(1.5, 0.3), noise.clone())
        return (x - (1.5 + 0.3 * noise)).abs().max().item()

    assert error(sampler, steps) < tolerance
    if sampler != "euler":
        assert error(sampler, steps) < error("euler", steps) / 2


def test_training_draws_are_reproducible_and_follow_the_density_and_the_shift():
    x0 = torch.zeros(4096, 4, 8, 8)
    flow = build_flow_scheduler()

    def sigmas(objective: DiffusionObjective, scheduler, seed: int = 0) -> torch.Tensor:
        t, _ = objective.draw(x0, scheduler, torch.Generator().manual_seed(seed))
        return t / 1000

    uniform, logit = DiffusionObjective(), DiffusionObjective(timesteps="logit_normal")
    assert torch.equal(sigmas(uniform, flow), sigmas(uniform, flow))
    assert not torch.equal(sigmas(uniform, flow), sigmas(uniform, flow, seed=1))
    drawn = sigmas(uniform, flow)
    assert drawn.min() >= 0 and drawn.max() <= 1 and abs(drawn.mean() - 0.5) < 0.02
    # logit-normal: more draws in the middle than uniform
    assert ((sigmas(logit, flow) - 0.5).abs() < 0.25).float().mean() > 0.6
    assert sigmas(uniform, build_flow_scheduler(shift=3.0)).mean() > 0.6  # shifted to noise
    # epsilon / v: integer timesteps; logit_normal over the same range
    t, _ = logit.draw(x0, build_noise_scheduler(), torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and t.min() >= 0 and t.max() <= 999


def test_flow_loss_is_zero_for_the_exact_target_and_weighted_as_asked():
    scheduler = build_flow_scheduler()
    x0, noise = torch.randn(2, 8, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    t = torch.linspace(0, 1000, 8)

    def exact(x_t: torch.Tensor, t_: torch.Tensor) -> torch.Tensor:
        return flow_target(x0, noise)

    assert flow_loss(exact, scheduler, x0, t, noise)["mse"] == 0
    zeros = torch.zeros_like
    plain = flow_loss(lambda x, t_: zeros(x), scheduler, x0, t, noise)["mse"]
    cosmap = flow_loss(lambda x, t_: zeros(x), scheduler, x0, t, noise, "cosmap")["mse"]
    assert torch.isfinite(cosmap) and cosmap != plain
    sigma_sqrt = flow_loss(lambda x, t_: zeros(x), scheduler, x0, t, noise, "sigma_sqrt")["mse"]
    assert torch.isfinite(sigma_sqrt)  # sigma 0 is held at 1 / 1000


def test_samplers_fit_the_objective():
    flow = dict(build_noise_scheduler(prediction_type="flow").config)
    epsilon = dict(build_noise_scheduler().config)
    assert sampler_name(None, flow) == "euler" and sampler_name(None, epsilon) == "ddim"
    with pytest.raises(UserError, match="sampler=ddim does not sample a flow model"):
        sampler_name("ddim", flow)
    with pytest.raises(UserError, match="sampler=heun does not sample an epsilon"):
        sampler_name("heun", epsilon)
    dynamic = dict(build_flow_scheduler(use_dynamic_shifting=True).config)
    with pytest.raises(UserError, match="no resolution-dependent shift"):
        sampler_name("heun", dynamic)
    dpmpp = build_sampler("dpmpp", build_flow_scheduler(shift=3.0).config)
    assert dpmpp.config.use_flow_sigmas and dpmpp.config.flow_shift == 3.0
    assert SamplingOptions().sampler is None


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"shift": 0.0}, "shift=0.0; need > 0"),
        (
            {"use_dynamic_shifting": True, "base_image_seq_len": 4096},
            "base_image_seq_len=4096, max_image_seq_len=4096: need 0 < base < max",
        ),
    ],
)
def test_bad_flow_options_are_one_line_errors(options, message):
    with pytest.raises(UserError, match=message):
        build_noise_scheduler(prediction_type="flow", **options)


def test_bad_objective_options_are_one_line_errors():
    with pytest.raises(UserError, match="timesteps='cosine' is not valid"):
        DiffusionObjective(timesteps="cosine")
    with pytest.raises(UserError, match="logit_std=0.0; need > 0"):
        DiffusionObjective(logit_std=0.0)
    with pytest.raises(UserError, match="weighting=cosmap weights the flow objective"):
        DiffusionObjective(weighting="cosmap").check(build_noise_scheduler())
