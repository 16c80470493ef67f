"""Sampling: from noise to images with a diffusers scheduler and classifier-free guidance.

One loop serves the validation grid and `python -m ldm_train.generate`. Each image's starting noise
comes from its own seed, so an image does not depend on the batch it was made in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from ldm_train import progress
from ldm_train.diffusion.conditioning import TextEncoder, text_context
from ldm_train.diffusion.latents import decode_latents
from ldm_train.diffusion.schedule import SAMPLERS, build_sampler
from ldm_train.errors import UserError
from ldm_train.formats.vae_folder import check_fits, vae_scale_factor
from ldm_train.rules import SEED, Choice, Int, Real, Rule

MAX_SIDE = 4096  # pixels: the largest width or height generated (the memory grows with the area)
# What each sampling option may be: for the config (validation samples, the chain), the export's
# recorded defaults and the commands' options alike. Guidance >= 1 as diffusers' pipelines read
# the scale (they guide only above 1), so that an export samples the same in both.
SAMPLING_RULES: dict[str, Rule] = {
    "sampler": Choice(SAMPLERS),
    "steps": Int(1, 1000),  # and at most the noise schedule's timesteps (sample checks)
    "guidance": Real(1, 100),
    "seed": SEED,
    "batch_size": Int(1, 4096),
}


@dataclass(frozen=True)
class SamplingOptions:
    """How to sample: the scheduler (ddim | euler | dpmpp), its number of steps, the
    classifier-free guidance scale (1: no guidance), the seed of the first image, images per
    forward pass. The defaults are for code that samples without a config (tests, notebooks); an
    export records the ones it was validated with, and the commands draw with those."""

    sampler: str = "ddim"
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
    unet: UNet2DConditionModel, vae: AutoencoderKL | None, size: Sequence[int]
) -> tuple[int, int, int]:
    """What sample() starts from for images of size (width, height): C x height/f x width/f, f the
    VAE's downsampling factor (1 in pixel space). Any size whose sides are multiples of f: the
    U-Net and the VAE are convolutional (diffusers' U-Net resizes its upsampling to odd sides)."""
    factor = vae_scale_factor(vae)
    width, height = (int(side) for side in size)
    if max(width, height) > MAX_SIDE:
        raise UserError(
            f"size {width}x{height}: each side must be at most {MAX_SIDE} pixels (memory grows "
            "with the area; generate in tiles, or at a smaller size and upscale)"
        )
    check_fits([(width, height)], factor, "the VAE")
    return (unet.config.in_channels, height // factor, width // factor)


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
    unet: UNet2DConditionModel,
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
            f"steps={options.steps} must be at most the {timesteps} timesteps the U-Net was "
            "trained on"
        )
    images = []
    starts = range(0, len(prompts), options.batch_size)
    # A bar only where a command shows one (ldm_train.progress), e.g. generate's; never in training.
    with progress.bar(len(starts) * options.steps, "sampling", "step"):
        for start in starts:
            batch = slice(start, start + options.batch_size)
            noise = initial_noise(latent_shape, seeds[batch])
            latents = denoise(
                unet,
                scheduler_config,
                list(prompts[batch]),
                noise,
                options,
                text_encoder,
                vae is None,
            )
            images.append(decode_latents(vae, latents).float().cpu())
    return torch.cat(images)


def denoise(
    unet: UNet2DConditionModel,
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
    scheduler.set_timesteps(options.steps, device=device)
    width = unet.config.cross_attention_dim
    guided = text_encoder is not None and options.guidance > 1
    context = text_context(text_encoder, prompts, width, device)
    if guided:  # classifier-free guidance: one batch with the empty caption, one with the prompt
        context = torch.cat(
            [text_context(text_encoder, [""] * len(prompts), width, device), context]
        )
    context = context.to(dtype)
    latents = noise.to(device) * scheduler.init_noise_sigma
    for t in progress.tick(scheduler.timesteps):
        model_input = torch.cat([latents] * 2) if guided else latents
        model_input = scheduler.scale_model_input(model_input, t)
        prediction = unet(model_input.to(dtype), t, encoder_hidden_states=context).sample.float()
        if guided:
            unconditional, conditional = prediction.chunk(2)
            prediction = unconditional + options.guidance * (conditional - unconditional)
        # The scheduler turns the predicted noise (or velocity) into the next, less noisy latent;
        # how far it moves is set by its noise schedule, not by a learning rate.
        latents = scheduler.step(prediction, t, latents).prev_sample
    return latents
