"""The VAE folder: a diffusers AutoencoderKL folder (config.json + safetensors weights), what
stage=vae exports and stage=unet, cache_latents and the U-Net's pipeline read. This module writes
it, finds it (a folder, or the vae/ of a pipeline), reads it and answers questions about it (its
downsampling factor, its latent scale), and holds the one rule sizes must follow with it:
image sides are multiples of its downsampling factor."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

from diffusers import AutoencoderKL

from ldm_train.errors import UserError, reading
from ldm_train.safety import check_safetensors

log = logging.getLogger(__name__)

CONFIG = "config.json"


def find_vae_folder(path: str | Path) -> Path | None:
    """The AutoencoderKL folder at path: path itself, or its vae/ subfolder (an exported pipeline,
    or a Stable Diffusion checkout); None if neither has a config.json."""
    path = Path(path)
    for folder in (path, path / "vae"):
        if (folder / CONFIG).is_file():
            return folder
    return None


def load_vae(path: str | Path | None) -> AutoencoderKL | None:
    """A diffusers AutoencoderKL folder (stage=vae's export, or e.g. Stable Diffusion's VAE), frozen;
    None for pixel space."""
    if path is None:
        return None
    folder = find_vae_folder(path)
    if folder is None:
        raise UserError(
            f"stage.vae: no VAE at {path} (no config.json there); make it with "
            "`python -m ldm_train stage=vae` (same data/experiment options), or set stage.vae to a "
            "diffusers AutoencoderKL folder, or stage.vae=null to train in pixel space"
        )
    check_safetensors(folder, f"stage.vae={path}")
    with reading(f"stage.vae={path}", " (a diffusers AutoencoderKL folder, safetensors weights)"):
        vae = AutoencoderKL.from_pretrained(folder, local_files_only=True, use_safetensors=True)
    log.info("VAE from %s (scaling_factor %s)", folder, vae.config.scaling_factor)
    return vae.eval().requires_grad_(False)


def save_vae(net: AutoencoderKL, out_dir: str | Path, scaling_factor: float) -> Path:
    """Write net as a VAE folder with this scaling_factor (1 / std of its latents), for
    AutoencoderKL.from_pretrained(out_dir)."""
    if not (math.isfinite(scaling_factor) and scaling_factor > 0):
        raise ValueError(f"scaling_factor={scaling_factor}: need a finite value > 0")
    net.register_to_config(scaling_factor=float(scaling_factor))
    out_dir = Path(out_dir)
    net.save_pretrained(out_dir, safe_serialization=True)
    log.info("exported the VAE to %s (scaling_factor %.5f)", out_dir, scaling_factor)
    return out_dir


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


def folder_factor(path: str | Path) -> tuple[int, Path] | None:
    """(downsampling factor, folder) of the VAE folder at path, read from its config.json alone
    (no weights loaded); None where there is no readable one (loading it says why)."""
    folder = find_vae_folder(path)
    if folder is None:
        return None
    try:
        channels = json.loads((folder / CONFIG).read_text()).get("block_out_channels")
    except (ValueError, AttributeError, OSError):
        return None
    if not isinstance(channels, list) or not channels:
        return None
    return downsampling_factor(channels), folder


def nearest_fit(side: int, factor: int) -> int:
    """The multiple of factor nearest to side (at least factor)."""
    return max(factor, round(side / factor) * factor)


def check_fits(
    sizes: Iterable[Sequence[int]], factor: int, source: str, name: str = "size", fix: str = ""
) -> None:
    """The latent-factor rule: every (width, height) must have sides that are multiples of the
    VAE's downsampling factor (else the decoder gives back fewer pixels than went in). `name`
    says how the size is called (e.g. "data.image_size=30"), `fix` what to do instead (default:
    the nearest sizes that fit)."""
    for width, height in sizes:
        width, height = int(width), int(height)
        if min(width, height) >= factor and not (width % factor or height % factor):
            continue
        label = name if "=" in name else f"{name} {width}x{height}"
        near = f"{nearest_fit(width, factor)}x{nearest_fit(height, factor)}"
        raise UserError(
            f"{label} is not a multiple of {factor}, the downsampling factor of {source}: "
            + (fix or f"width and height must be multiples of {factor} (e.g. {near})")
        )


def check_training_sizes(
    image_size: int, buckets: Iterable[Sequence[int]] | None, factor: int, source: str
) -> None:
    """data.image_size and the buckets' sizes under the latent-factor rule (check_fits)."""
    fix = f"use multiples of {factor} in data.buckets (or data.bucket_step={factor})"
    check_fits(buckets or [], factor, source, "bucket", fix)
    fix = f"use e.g. data.image_size={nearest_fit(image_size, factor)}"
    check_fits([(image_size, image_size)], factor, source, f"data.image_size={image_size}", fix)
