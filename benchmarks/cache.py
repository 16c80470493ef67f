"""Latent caching: steps/s of stage=unet (tiny preset, through trainer.fit and our loader with one
worker) training from shards cached by `python -m ldm_train.cache_latents` (VAE moments + text
hidden states) against encoding the images and captions at every step (target >= 2x).

A cache saves at most the frozen parts' share of a step: the bound (VAE encode + text encoder +
U-Net forward and backward) / (U-Net forward and backward), from FLOPs counted by torch's
FlopCounterMode on meta tensors (no memory, no compute), is printed for the tiny presets and for
SD 1.5 (its U-Net, the SD VAE, CLIP ViT-L/14's text tower) at 256 and 512 px."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import open_clip
import torch
from hydra.utils import instantiate
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import (
    alternate,
    fit_rates,
    fit_ratio_line,
    make_data,
    setup_process,
    stage_config,
    write_upstream,
)
from ldm_train.cache_latents import cache_latents
from ldm_train.config import compose_config
from ldm_train.formats.vae_folder import vae_scale_factor

STEPS, WARMUP, RUNS = 12, 3, 2
# (U-Net preset, VAE preset, open_clip card of the text tower or None: the clip tiny preset, px)
FLOP_CASES = [
    ("tiny", "tiny", None, 32),
    ("sd15", "sd", "ViT-L-14", 256),
    ("sd15", "sd", "ViT-L-14", 512),
]


def flops(run) -> int:
    with FlopCounterMode(display=False) as counter:
        run()
    return counter.get_total_flops()


def cache_bound(unet: str, vae: str, text_card: str | None, size: int) -> str:
    """FLOPs per image of the frozen parts and of a U-Net training step, and the bound they set."""
    unet_cfg = compose_config(["stage=unet", f"model=unet/{unet}", f"data.image_size={size}"])
    vae_cfg = compose_config(["stage=vae", f"model=vae/{vae}", f"data.image_size={size}"])
    with torch.device("meta"):
        autoencoder = instantiate(vae_cfg.model.net)
        if text_card is None:
            text_tower = instantiate(compose_config(["stage=clip"]).model.net)
        else:
            text_tower = open_clip.CLIP(**open_clip.get_model_config(text_card))
        channels, side = autoencoder.config.latent_channels, size // vae_scale_factor(autoencoder)
        width, length = text_tower.transformer.width, text_tower.context_length
        net = instantiate(unet_cfg.model.net)(
            in_channels=channels,
            out_channels=channels,
            cross_attention_dim=width,
            sample_size=side,
        )
        images = torch.empty(1, 3, size, size)
        tokens = torch.zeros(1, length, dtype=torch.long)
        latents, context = torch.empty(1, channels, side, side), torch.empty(1, length, width)
        encode = flops(lambda: autoencoder.encode(images))
        text = flops(lambda: text_tower.encode_text(tokens))
        step = flops(
            lambda: net(latents, torch.zeros(1, dtype=torch.long), context).sample.sum().backward()
        )
    return (
        f"latent cache bound, unet {unet} + vae {vae} + text {text_card or 'clip tiny'} at "
        f"{size}px: VAE encode {encode / 1e9:.2f} + text {text / 1e9:.3f} GFLOP vs U-Net "
        f"forward+backward {step / 1e9:.2f} GFLOP per image = at most "
        f"{(encode + text + step) / step:.2f}x"
    )


def main() -> None:
    setup_process()
    with tempfile.TemporaryDirectory() as tmp:
        root = make_data(Path(tmp) / "shapes-32")
        upstream = write_upstream(Path(tmp) / "upstream")
        overrides = [
            "data.num_workers=1",
            f"stage.vae={upstream['vae']}",
            f"stage.text_encoder={upstream['clip']}",
        ]
        cfg = stage_config("unet", root, Path(tmp) / "out", *overrides)
        start = time.perf_counter()
        info = cache_latents(cfg, Path(tmp) / "latents", device="cpu")
        seconds = time.perf_counter() - start
        cached = stage_config(
            "unet", root, Path(tmp) / "out", *overrides, f"data.train_urls='{info['train_urls']}'"
        )
        on_the_fly, from_cache = alternate(
            RUNS, lambda: fit_rates(cfg, STEPS, WARMUP), lambda: fit_rates(cached, STEPS, WARMUP)
        )
        name = f"latent cache unet (batch {cfg.data.batch_size})"
        print(fit_ratio_line(name, from_cache, on_the_fly, "encoding on the fly"), flush=True)
        print(
            f"latent cache: encoding {info['samples_written']} images + captions took "
            f"{seconds:.1f} s = {info['samples_written'] / seconds:.0f} samples/s",
            flush=True,
        )
    for case in FLOP_CASES:
        print(cache_bound(*case), flush=True)


if __name__ == "__main__":
    main()
