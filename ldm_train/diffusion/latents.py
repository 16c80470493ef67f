"""The U-Net's latent encoding: images -> x0, what the U-Net denoises, and back (decode_latents).

One part of the U-Net stage: the frozen VAE's sampled, scaled latents (the encoder's Gaussians kept
by sample key in a cache, or read from latent-cache shards), or, without a VAE, the images
themselves (pixel space).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from ldm_train.diffusion.frozen import Frozen, KeyedCache
from ldm_train.errors import UserError
from ldm_train.formats.vae_folder import check_training_sizes, latent_scale, vae_scale_factor


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


class LatentEncoder:
    """Frozen, so shared rather than copied (deepcopy returns it), like Conditioning."""

    def __init__(
        self,
        vae: AutoencoderKL | None = None,
        image_size: int = 32,
        image_channels: int = 3,
        cache_size: int = 0,
        sizes: Sequence[Sequence[int]] | None = None,
    ):
        """cache_size: training images whose latent Gaussians are kept, by sample key; only with
        deterministic image transforms (no random flip or crop). 0 keeps none. sizes: the
        (width, height) of the loader's aspect-ratio buckets, if on (`${bucket_sizes:${data}}`)."""
        self.factor = vae_scale_factor(vae)
        check_training_sizes(image_size, sizes, self.factor, "the VAE")
        # (h, w) of the latents a cache may hold: one per bucket, else the square's.
        self.latent_sides = {(h // self.factor, w // self.factor) for w, h in sizes or []}
        self._vae = Frozen(vae)
        self.cache = KeyedCache(cache_size)
        self.image_size = image_size
        channels = vae.config.latent_channels if vae is not None else image_channels
        side = image_size // self.factor
        self.shape = (channels, side, side)  # of one x0 at data.image_size
        self.latent_sides = self.latent_sides or {(side, side)}

    def __deepcopy__(self, memo: dict) -> LatentEncoder:
        return self

    @property
    def channels(self) -> int:
        return self.shape[0]

    @property
    def side(self) -> int:
        return self.shape[-1]

    def vae(self, device: torch.device) -> AutoencoderKL | None:
        """The frozen VAE, moved to `device` if needed; None in pixel space."""
        return self._vae.on(device)

    def encode(
        self,
        images: torch.Tensor,
        generator: torch.Generator,
        keys: Sequence[str] | None = None,
    ) -> torch.Tensor:
        """x0 of images: sampled, scaled latents (the Gaussians kept by sample key in the cache,
        if keys are given and the cache is on), or the images themselves in pixel space."""
        vae = self.vae(images.device)
        if vae is None or keys is None:
            return encode_images(vae, images, generator)
        if len(self.latent_sides) > 1:  # buckets: a sample moved to another bucket is another key
            keys = [f"{key}@{images.shape[-1]}x{images.shape[-2]}" for key in keys]
        distribution = self.cache.lookup(
            keys, lambda indices: latent_distribution(vae, images[indices])
        )
        return sample_latents(vae, distribution, generator)

    def batch_latents(
        self, batch: dict, generator: torch.Generator, device: torch.device
    ) -> torch.Tensor:
        """x0 of a training batch: from its images, or sampled from the latent moments a cache
        shard holds (the same draw from the generator, so the same x0 as encoding the images)."""
        if "latent" not in batch:
            return self.encode(batch["image"], generator, batch.get("key"))
        vae = self.vae(device)
        if vae is None:
            raise UserError(
                "the training shards hold cached latents but stage.vae=null (pixel space): point "
                "data.train_urls at image shards, or set stage.vae to the VAE of the cache"
            )
        moments = batch["latent"].to(device, torch.float32)
        channels = self.shape[0]
        if moments.shape[1] != 2 * channels or tuple(moments.shape[2:]) not in self.latent_sides:
            expected = [(2 * channels, *side) for side in sorted(self.latent_sides)]
            raise UserError(
                f"cached latent moments are {tuple(moments.shape[1:])}, this VAE and "
                f"data.image_size (and buckets) give {', '.join(map(str, expected))}: cache again "
                "with the same stage.vae, data.image_size and buckets "
                "(python -m ldm_train.cache_latents)"
            )
        return sample_latents(vae, moments_to_distribution(moments), generator)
