"""The frozen upstream parts of the U-Net stage: the VAE (images <-> latents) and the text encoder
(captions -> cross-attention context). Both optional: no VAE trains in pixel space, no text encoder
trains an unconditional U-Net."""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import torch
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from ldm_train.errors import UserError

log = logging.getLogger(__name__)


class TextEncoder(Protocol):
    """What the U-Net stage needs from a text encoder (ldm_train.diffusion.text_encoder.ClipTextEncoder)."""

    width: int

    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]: ...

    def end_positions(self, captions: list[str]) -> torch.Tensor: ...


def vae_folder(path: str | Path) -> Path | None:
    """The AutoencoderKL folder at path: path itself, or its vae/ subfolder (an exported pipeline,
    or a Stable Diffusion checkout); None if neither has a config.json."""
    path = Path(path)
    for folder in (path, path / "vae"):
        if (folder / "config.json").is_file():
            return folder
    return None


def load_vae(path: str | Path | None) -> AutoencoderKL | None:
    """A diffusers AutoencoderKL folder (stage=vae's export, or e.g. Stable Diffusion's VAE), frozen;
    None for pixel space."""
    if path is None:
        return None
    folder = vae_folder(path)
    if folder is None:
        raise UserError(
            f"stage.vae: no VAE at {path} (no config.json there); make it with "
            "`python -m ldm_train stage=vae` (same data/experiment options), or set stage.vae to a "
            "diffusers AutoencoderKL folder, or stage.vae=null to train in pixel space"
        )
    vae = AutoencoderKL.from_pretrained(folder)
    log.info("VAE from %s (scaling_factor %s)", folder, vae.config.scaling_factor)
    return vae.eval().requires_grad_(False)


def latent_scale(vae: AutoencoderKL) -> tuple[float, float]:
    """(scaling_factor, shift_factor) from the VAE's config: latents are (z - shift) * scale."""
    scale = vae.config.get("scaling_factor")
    if scale is None:
        raise UserError("the VAE's config.json has no scaling_factor; set one (1 / std of latents)")
    return float(scale), float(vae.config.get("shift_factor") or 0.0)


def downsampling_factor(block_out_channels: Sequence[int]) -> int:
    """Pixels per latent cell along a side of an AutoencoderKL with these blocks: each down block
    but the last halves the size (diffusers pipelines compute it the same way)."""
    return 2 ** (len(block_out_channels) - 1)


def vae_scale_factor(vae: AutoencoderKL | None) -> int:
    """Pixels per latent cell along a side; 1 without a VAE (pixel space)."""
    return 1 if vae is None else downsampling_factor(vae.config.block_out_channels)


def no_autocast(device: torch.device) -> torch.autocast:
    """Mixed precision off: the VAE runs in its own dtype (fp32). SD's VAE overflows in fp16, and
    bf16 latents would lose the precision the U-Net is trained to match."""
    return torch.autocast(device.type, enabled=False)


def vae_moments(vae: AutoencoderKL, images: torch.Tensor) -> torch.Tensor:
    """The VAE encoder's output per latent cell, B x 2C x h x w (mean, log-variance): the
    parameters of diffusers' DiagonalGaussianDistribution, what a latent cache stores."""
    with no_autocast(images.device):
        return vae.encode(images.to(vae.dtype)).latent_dist.parameters


def moments_to_distribution(moments: torch.Tensor) -> torch.Tensor:
    """B x 2C x h x w moments -> B x 2 x C x h x w (mean, std), via diffusers' Gaussian."""
    dist = DiagonalGaussianDistribution(moments)
    return torch.stack([dist.mean, dist.std], dim=1)


def latent_distribution(vae: AutoencoderKL, images: torch.Tensor) -> torch.Tensor:
    """The VAE encoder's Gaussian per latent cell: B x 2 x C x h x w (mean, std)."""
    return moments_to_distribution(vae_moments(vae, images))


def sample_latents(
    vae: AutoencoderKL, distribution: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """One sample of each Gaussian, scaled as the U-Net sees it: (z - shift) * scaling_factor.
    (diffusers' latent_dist.sample, from a mean and std that may come from a cache.)"""
    mean, std = distribution.unbind(dim=1)
    noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    scale, shift = latent_scale(vae)
    return (mean + std * noise - shift) * scale


def encode_images(
    vae: AutoencoderKL | None, images: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Images in [-1, 1] -> the U-Net's input space: sampled, scaled latents (or the images)."""
    if vae is None:
        return images
    return sample_latents(vae, latent_distribution(vae, images), generator)


def decode_latents(vae: AutoencoderKL | None, latents: torch.Tensor) -> torch.Tensor:
    """The inverse of encode_images: images in [-1, 1]."""
    if vae is None:
        return latents.clamp(-1, 1)
    scale, shift = latent_scale(vae)
    with no_autocast(latents.device):
        return vae.decode(latents.to(vae.dtype) / scale + shift).sample.clamp(-1, 1)


def text_context(
    text_encoder: TextEncoder | None, captions: list[str], width: int, device: torch.device
) -> torch.Tensor:
    """Cross-attention context B x L x width. Without a text encoder: one zero token, so the same
    UNet2DConditionModel trains unconditionally (its cross-attention then adds a learned constant)."""
    if text_encoder is None:
        return torch.zeros(len(captions), 1, width, device=device)
    hidden_states, _ = text_encoder(list(captions))
    return hidden_states.to(device)


def pooled_text(
    text_encoder: TextEncoder | None, context: torch.Tensor, captions: list[str]
) -> torch.Tensor:
    """B x width: each caption's end-token state in its hidden states `context` (a CLIPTextModel's
    pooler_output), the pooled text vector a transformer denoiser reads. Only the captions are
    tokenized, so it works on cached hidden states too. Without a text encoder: zeros."""
    if text_encoder is None:
        return context.new_zeros(len(context), context.shape[-1])
    positions = text_encoder.end_positions(list(captions)).to(context.device)
    return context[torch.arange(len(context), device=context.device), positions]


class KeyedCache:
    """A bounded LRU of per-item tensors (a caption's hidden states, an image's latent Gaussian):
    lookup computes only the items it has not kept. The upstream parts are frozen, so a kept
    result is exactly what recomputing would give; size 0 keeps nothing."""

    def __init__(self, size: int = 0):
        self.size = size
        self.items: OrderedDict[str, torch.Tensor] = OrderedDict()

    def lookup(
        self, keys: Sequence[str], compute: Callable[[list[int]], torch.Tensor]
    ) -> torch.Tensor:
        """The items for keys, stacked; compute(indices into keys) gives the missing ones."""
        if self.size <= 0:
            return compute(list(range(len(keys))))
        first_index = {key: i for i, key in reversed(list(enumerate(keys)))}
        missing = [i for key, i in first_index.items() if key not in self.items]
        if missing:
            for i, item in zip(missing, compute(missing), strict=True):
                self.items[keys[i]] = item
        stacked = torch.stack([self.items[key] for key in keys])
        for key in keys:
            self.items.move_to_end(key)
        while len(self.items) > self.size:
            self.items.popitem(last=False)
        return stacked


class Frozen:
    """Holds a frozen upstream module outside the LightningModule's registered children, so it stays
    out of checkpoints, the optimizer, DDP and the EMA copy (deepcopy shares it, never copies it).
    It follows the stage's device when asked for (`on`)."""

    def __init__(self, module: torch.nn.Module | None):
        if module is not None:
            module.eval().requires_grad_(False)
        self.module = module

    def on(self, device: torch.device) -> torch.nn.Module | None:
        if self.module is not None:
            first = next(iter(self.module.parameters()), None)
            if first is not None and first.device != device:
                self.module.to(device)
        return self.module

    def __deepcopy__(self, memo: dict) -> Frozen:
        return self
