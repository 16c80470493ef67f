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

from ldm_train import progress
from ldm_train.diffusion.conditioning import TextEncoder, pooled_text, text_context
from ldm_train.diffusion.denoiser import (
    Denoiser,
    context_width,
    is_transformer,
    patch_size,
    predict,
)
from ldm_train.diffusion.flow import image_seq_len, shift_mu
from ldm_train.diffusion.latents import decode_latents
from ldm_train.diffusion.schedule import ALL_SAMPLERS, build_sampler
from ldm_train.errors import UserError
from ldm_train.formats.vae_folder import check_fits, vae_scale_factor
from ldm_train.rules import SEED, Choice, Int, Real, Rule

MAX_SIDE = 4096  # pixels: the largest width or height generated (the memory grows with the area)
# What each sampling option may be: for the config (validation samples, the chain), the export's
# recorded defaults and the commands' options alike. Guidance >= 1 as diffusers' pipelines read
# the scale (they guide only above 1), so that an export samples the same in both.
SAMPLING_RULES: dict[str, Rule] = {
    "sampler": Choice(ALL_SAMPLERS, null=True),  # null: the model's default (ddim; flow: euler)
    "steps": Int(1, 1000),  # and at most the noise schedule's timesteps (sample checks)
    "guidance": Real(1, 100),
    "seed": SEED,
    "batch_size": Int(1, 4096),
}


@dataclass(frozen=True)
class SamplingOptions:
    """How to sample: the scheduler (ddim | euler | dpmpp; a flow model: euler | heun | dpmpp;
    None: ddim, for flow euler), its number of steps, the classifier-free guidance scale (1: no
    guidance), the seed of the first image, images per forward pass. The defaults are for code
    that samples without a config (tests, notebooks); an export records the ones it was validated
    with, and the commands draw with those."""

    sampler: str | None = None
    steps: int = 50
    guidance: float = 4.0
    seed: int = 0
    batch_size: int = 64

    def __post_init__(self) -> None:
        for name, rule in SAMPLING_RULES.items():
            rule.check(name, getattr(self, name))

    @classmethod
    def from_record(cls, record: object, source: str) -> SamplingOptions:
        """The options a file records (an export's index), field by field; one line if not."""
        if not isinstance(record, dict) or set(record) - set(SAMPLING_RULES):
            raise UserError(f"{source}: sampling must hold only {', '.join(SAMPLING_RULES)}")
        try:
            return cls(**record)
        except UserError as error:
            raise UserError(f"{source}: sampling.{error}") from None


def latent_shape(
    net: Denoiser, vae: AutoencoderKL | None, size: Sequence[int]
) -> tuple[int, int, int]:
    """What sample() starts from for images of size (width, height): C x height/f x width/f, f the
    VAE's downsampling factor (1 in pixel space). Any size whose sides are multiples of f: the
    U-Net and the VAE are convolutional (diffusers' U-Net resizes its upsampling to odd sides); a
    transformer also needs whole patches."""
    factor = vae_scale_factor(vae) * patch_size(net)
    width, height = (int(side) for side in size)
    if max(width, height) > MAX_SIDE:
        raise UserError(
            f"size {width}x{height}: each side must be at most {MAX_SIDE} pixels (memory grows "
            "with the area; generate in tiles, or at a smaller size and upscale)"
        )
    source = "the VAE" if patch_size(net) == 1 else "the VAE times the transformer's patch size"
    check_fits([(width, height)], factor, source)
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
    timesteps = scheduler_config.get("num_train_timesteps", 1000)
    if options.steps > timesteps:
        raise UserError(
            f"steps={options.steps} must be at most the {timesteps} timesteps the model was "
            "trained on"
        )
    images = []
    starts = range(0, len(prompts), options.batch_size)
    # A bar only where a command shows one (ldm_train.progress), e.g. generate's; never in training.
    with progress.bar(len(starts) * options.steps, "sampling", "step"):
        for start in starts:
            batch = slice(start, start + options.batch_size)
            noise = initial_noise(latent_shape, seeds[batch])
            batch_prompts = list(prompts[batch])
            latents = denoise(
                unet, scheduler_config, batch_prompts, noise, options, text_encoder, vae is None
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
    for t in progress.tick(scheduler.timesteps):
        output = prediction(scale(latents, t), t)
        latents = scheduler.step(output, t, latents).prev_sample
    return latents
