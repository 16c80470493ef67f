"""Sampling: from noise to images with a diffusers scheduler and classifier-free guidance.

One loop serves the validation grid and `python -m ldm_train.generate`. Each image's starting noise
comes from its own seed, so an image does not depend on the batch it was made in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from ldm_train.diffusion.denoiser import (
    Denoiser,
    context_width,
    is_transformer,
    patch_size,
    predict,
)
from ldm_train.diffusion.flow import image_seq_len, shift_mu
from ldm_train.diffusion.frozen import (
    TextEncoder,
    decode_latents,
    pooled_text,
    text_context,
    vae_scale_factor,
)
from ldm_train.diffusion.schedule import ALL_SAMPLERS, build_sampler
from ldm_train.errors import UserError, check_choice


@dataclass(frozen=True)
class SamplingOptions:
    """How to sample: the scheduler (ddim | euler | dpmpp; a flow model: euler | heun | dpmpp;
    None: ddim, for flow euler), its number of steps, the classifier-free guidance scale (1: no
    guidance) and the seed of the first image."""

    sampler: str | None = None
    steps: int = 50
    guidance: float = 4.0
    seed: int = 0
    batch_size: int = 64

    def __post_init__(self) -> None:
        if self.sampler is not None:
            check_choice("sampler", self.sampler, ALL_SAMPLERS)
        if self.steps < 1:
            raise UserError(f"steps={self.steps}; need at least 1 sampling step")
        if self.guidance < 1:
            # As diffusers' pipelines read the scale (they guide only above 1), so that an export
            # samples the same in both; the prompt "" gives unconditional samples.
            raise UserError(f"guidance={self.guidance}; need a scale >= 1 (1: no guidance)")
        if self.batch_size < 1:
            raise UserError(f"batch_size={self.batch_size}; need >= 1")


def latent_shape(
    net: Denoiser, vae: AutoencoderKL | None, size: Sequence[int]
) -> tuple[int, int, int]:
    """What sample() starts from for images of size (width, height): C x height/f x width/f, f the
    VAE's downsampling factor (1 in pixel space). Any size whose sides are multiples of f: the
    U-Net and the VAE are convolutional (diffusers' U-Net resizes its upsampling to odd sides); a
    transformer also needs whole patches."""
    factor = vae_scale_factor(vae) * patch_size(net)
    width, height = (int(side) for side in size)
    if min(width, height) < factor or width % factor or height % factor:
        near = "x".join(str(max(factor, round(side / factor) * factor)) for side in (width, height))
        raise UserError(
            f"size {width}x{height}: width and height must be multiples of {factor}, the VAE's "
            f"downsampling factor (times the transformer's patch size) (e.g. {near})"
        )
    cells = vae_scale_factor(vae)
    return (net.config.in_channels, height // cells, width // cells)


def initial_noise(shape: Sequence[int], seeds: Sequence[int]) -> torch.Tensor:
    """One N(0, 1) tensor of `shape` per seed, drawn on the CPU: the same on every device."""
    return torch.stack(
        [torch.randn(tuple(shape), generator=torch.Generator().manual_seed(s)) for s in seeds]
    )


def per_prompt(prompts: Sequence[str], n: int, seed: int) -> tuple[list[str], list[int]]:
    """n images per prompt, prompt-major: (prompt of each image, its seed). Image j of every
    prompt starts from seed + j, so a column of a grid shares its starting noise."""
    return [p for p in prompts for _ in range(n)], [seed + j for _ in prompts for j in range(n)]


@torch.no_grad()
def sample(
    unet: Denoiser,
    scheduler_config: dict,
    prompts: Sequence[str],
    seeds: Sequence[int],
    latent_shape: Sequence[int],
    options: SamplingOptions,
    vae: AutoencoderKL | None = None,
    text_encoder: TextEncoder | None = None,
) -> torch.Tensor:
    """Images (N x C x H x W in [-1, 1]) for prompts[i] from the noise of seeds[i]."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    images = []
    for start in range(0, len(prompts), options.batch_size):
        batch = slice(start, start + options.batch_size)
        noise = initial_noise(latent_shape, seeds[batch])
        latents = denoise(
            unet, scheduler_config, list(prompts[batch]), noise, options, text_encoder, vae is None
        )
        images.append(decode_latents(vae, latents).float().cpu())
    return torch.cat(images)


def denoise(
    unet: Denoiser,
    scheduler_config: dict,
    prompts: list[str],
    noise: torch.Tensor,
    options: SamplingOptions,
    text_encoder: TextEncoder | None,
    pixel_space: bool,
) -> torch.Tensor:
    """The sampling loop: the scheduler walks its timesteps from pure noise to a clean latent."""
    device, dtype = unet.device, unet.dtype
    scheduler = build_sampler(options.sampler, scheduler_config, pixel_space)
    mu = shift_mu(scheduler_config, image_seq_len(noise.shape, patch_size(unet)))
    scheduler.set_timesteps(options.steps, device=device, **({} if mu is None else {"mu": mu}))
    guided = text_encoder is not None and options.guidance > 1
    # classifier-free guidance: one batch with the empty caption, one with the prompt
    captions = ([""] * len(prompts) if guided else []) + list(prompts)
    context = text_context(text_encoder, captions, context_width(unet), device)
    pooled = None
    if is_transformer(unet):
        pooled = pooled_text(text_encoder, context, captions).to(dtype)
    context = context.to(dtype)

    def prediction(latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        model_input = torch.cat([latents] * 2) if guided else latents
        output = predict(unet, model_input.to(dtype), t, context, pooled).float()
        if not guided:
            return output
        unconditional, conditional = output.chunk(2)
        return unconditional + options.guidance * (conditional - unconditional)

    return run_scheduler(scheduler, prediction, noise.to(device))


def run_scheduler(scheduler: SchedulerMixin, prediction, noise: torch.Tensor) -> torch.Tensor:
    """From noise (scaled by the scheduler's init_noise_sigma) along scheduler.timesteps (set):
    at each, prediction(latents, t) and the scheduler's step to the next, less noisy latent; how
    far it moves is set by its noise schedule, not by a learning rate. Flow schedulers have no
    init_noise_sigma or scale_model_input (their input is not rescaled)."""
    latents = noise * getattr(scheduler, "init_noise_sigma", 1.0)
    scale = getattr(scheduler, "scale_model_input", lambda sample, t: sample)
    for t in scheduler.timesteps:
        output = prediction(scale(latents, t), t)
        latents = scheduler.step(output, t, latents).prev_sample
    return latents
