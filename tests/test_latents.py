"""The U-Net's latent-encoding part on its own: sampled, scaled latents of the frozen VAE, the
latent cache, moments from latent-cache shards, pixel space, and one-line errors."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import AutoencoderKL

from ldm_train.diffusion.latents import LatentEncoder, vae_moments
from ldm_train.errors import UserError
from ldm_train.formats.vae_folder import load_vae

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def vae(upstream) -> AutoencoderKL:
    return load_vae(upstream["vae"])


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1


def generator() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def test_latents_are_the_vaes_scaled_samples(vae, images):
    latents = LatentEncoder(vae, image_size=32)
    assert latents.shape == (4, 8, 8) and latents.channels == 4 and latents.factor == 4
    x0 = latents.encode(images, generator())
    with torch.no_grad():
        expected = vae.encode(images).latent_dist.sample(generator()) * vae.config.scaling_factor
    assert torch.allclose(x0, expected, atol=1e-6)


def test_the_cache_and_cached_moments_give_the_same_x0(vae, images):
    keys = [f"k{i}" for i in range(len(images))]
    plain = LatentEncoder(vae, image_size=32).encode(images, generator(), keys)
    cached = LatentEncoder(vae, image_size=32, cache_size=8)
    for _ in range(2):  # the second call reads what the first kept
        assert torch.allclose(cached.encode(images, generator(), keys), plain, atol=1e-6)
    assert set(cached.cache.items) == set(keys)
    moments = vae_moments(vae, images)
    from_shards = cached.batch_latents({"latent": moments}, generator(), CPU)
    assert torch.allclose(from_shards, plain, atol=1e-6)
    with pytest.raises(UserError, match=r"cached latent moments are \(8, 4, 4\)"):
        cached.batch_latents({"latent": moments[:, :, :4, :4]}, generator(), CPU)


def test_pixel_space_is_the_images(images):
    latents = LatentEncoder(None, image_size=32)
    assert latents.shape == (3, 32, 32) and latents.vae(CPU) is None
    assert torch.equal(latents.encode(images, generator()), images)
    with pytest.raises(UserError, match="cached latents but stage.vae=null"):
        latents.batch_latents({"latent": images}, generator(), CPU)


def test_image_size_must_be_a_multiple_of_the_vaes_factor(vae):
    with pytest.raises(
        UserError,
        match=r"data.image_size=30 is not a multiple of 4, the downsampling factor of the VAE",
    ):
        LatentEncoder(vae, image_size=30)


def test_a_copy_shares_the_frozen_vae(vae):
    latents = LatentEncoder(vae, image_size=32, cache_size=4)
    assert copy.deepcopy(latents) is latents
    assert not vae.training and not any(p.requires_grad for p in vae.parameters())
