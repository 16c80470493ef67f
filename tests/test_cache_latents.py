"""Latent caching: the cache holds exactly what encoding on the fly computes, a training stream over
it gives the same batches (keys, flips) and the same loss as over the images, and stage=unet trains
and resumes from it through the real train()."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from ldm_train.cache_latents import INFO_FILE, cache_latents, main
from ldm_train.data.datamodule import WebDataModule
from ldm_train.data.stream import LATENT_FLIP_KEY, StreamStats, read_pass
from ldm_train.diffusion.conditioning import text_context
from ldm_train.diffusion.latents import vae_moments
from ldm_train.train import train

pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log")


@pytest.fixture
def flipped_cache(unet_cfg, tmp_path):
    """The tiny shards cached with flips on (both mirror images encoded)."""
    cfg = unet_cfg("data.random_flip=true")
    info = cache_latents(cfg, tmp_path / "cache")
    return cfg, info


def first_batch(cfg, train_urls: str | None = None) -> dict:
    if train_urls is not None:
        cfg.data.train_urls = train_urls
    return next(iter(WebDataModule.from_config(cfg.data).train_dataloader()))


def in_file_order(cfg, urls) -> dict:
    """The first batch of one unshuffled, unflipped pass over urls (the validation reader)."""
    cfg = cfg.copy()
    cfg.data.val_urls = urls
    return next(iter(WebDataModule.from_config(cfg.data).val_dataloader()))


def test_cached_latents_equal_encoding_on_the_fly(flipped_cache, tmp_path):
    cfg, info = flipped_cache
    assert info["samples_written"] == 256 and info["shards_written"] == 4 and info["flips"]
    assert json.loads((tmp_path / "cache" / INFO_FILE).read_text())["latent_moments"] == [8, 8, 8]
    stage = instantiate(cfg.stage.module)
    vae, text_encoder = (
        stage.latents.vae(stage.device),
        stage.conditioning.text_encoder(stage.device),
    )
    image_batch = in_file_order(cfg, cfg.data.train_urls)
    cached_batch = in_file_order(cfg, info["train_urls"])
    assert cached_batch["key"] == image_batch["key"]
    assert cached_batch["caption"] == image_batch["caption"]
    assert cached_batch["meta"] == image_batch["meta"]
    pixels = image_batch["image"]
    with torch.no_grad():
        assert torch.equal(cached_batch["latent"], vae_moments(vae, pixels))
        text = text_context(text_encoder, image_batch["caption"], 32, torch.device("cpu"))
        assert torch.allclose(cached_batch["text"], text, atol=1e-6)
        # The mirrored image's moments, which a flipping stream picks.
        shard = info["train_urls"].replace("{000000..000003}", "000000")
        first = next(read_pass([shard], 0, 1, StreamStats()))
        flipped = torch.from_numpy(np.load(io.BytesIO(first[LATENT_FLIP_KEY])))
        assert torch.equal(flipped, vae_moments(vae, pixels.flip(-1))[0])  # same batch


# The transformer (flow) reads the captions' pooled vector, found in the cached hidden states.
@pytest.mark.parametrize("net", [[], ["model=unet/dit_tiny", "model.net.num_layers=1"]])
def test_a_step_from_the_cache_equals_a_step_from_images(flipped_cache, unet_cfg, net):
    cfg, info = flipped_cache
    image_batch = first_batch(cfg.copy())  # the shuffled, flipped training stream
    cached_batch = first_batch(cfg.copy(), info["train_urls"])
    assert cached_batch["key"] == image_batch["key"]  # same order: same shuffle
    assert "image" not in cached_batch and cached_batch["latent"].shape == (8, 8, 8, 8)
    cfg = unet_cfg("data.random_flip=true", *net)
    plain = instantiate(cfg.stage.module)
    cached = instantiate(cfg.stage.module)
    cached.net.load_state_dict(plain.net.state_dict())
    for batch_idx in (0, 1, 2):  # different t, noise and dropped captions; flips from the stream
        expected = plain.training_step(image_batch, batch_idx)
        assert torch.allclose(cached.training_step(cached_batch, batch_idx), expected, atol=1e-5)


def test_unet_trains_and_resumes_from_the_cache(unet_cfg, tmp_path, capsys):
    out = tmp_path / "cli-cache"
    overrides = [f"paths.output_root={tmp_path / 'outputs'}"]
    cfg = unet_cfg()
    # The command line, on the composed config's data and parts.
    assert main(["--out", str(out), "--dtype", "float16", *cli_overrides(cfg), *overrides]) == 0
    assert "data.train_urls=" in capsys.readouterr().out
    urls = f"data.train_urls='{out}/train-{{000000..000003}}.tar'"
    metrics, objects = train(unet_cfg(urls, "trainer.max_steps=2"))
    assert torch.isfinite(torch.tensor(metrics["train/mse"]))
    metrics, objects = train(unet_cfg(urls, "trainer.max_steps=4"))  # resume=auto: continues
    assert objects["trainer"].global_step == 4 and "val/mse" in metrics


def cli_overrides(cfg) -> list[str]:
    """The overrides that make python -m ldm_train.cache_latents compose the test's config."""
    return [
        f"stage.vae={cfg.stage.vae}",
        f"stage.text_encoder={cfg.stage.text_encoder}",
        f"data.train_urls='{cfg.data.train_urls}'",
        "data.make_dataset=null",
        "data.batch_size=32",
    ]
