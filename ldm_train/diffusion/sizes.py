"""Generating at other sizes than the training square: each prompt at its own (width, height).

A prompt of `data.prompts` may carry "width" and "height" (pixels, multiples of the VAE's
factor); the others take the pipeline's square. Prompts of one size are sampled together
(ldm_train.diffusion.sampler.sample with that size's latent shape); image j of every prompt starts
from the noise of seed + j, as in Pipeline.generate. The grid pads smaller images with white to the
largest one, so rows of several shapes sit in one picture.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torchvision.utils import save_image

from ldm_train.callbacks.images import image_grid
from ldm_train.diffusion.sampler import SamplingOptions, latent_shape, sample
from ldm_train.errors import UserError

Size = tuple[int, int]  # (width, height) in pixels


def prompt_sizes(prompts: Sequence[Any], default: int) -> list[Size]:
    """(width, height) of each prompt: its own "width" and "height", else default x default."""
    sizes = []
    for prompt in prompts:
        given = prompt if isinstance(prompt, Mapping) else {}
        width, height = given.get("width", default), given.get("height", default)
        if not all(isinstance(side, int) and side > 0 for side in (width, height)):
            raise UserError(f"prompt {prompt!r}: width and height must be positive integers")
        sizes.append((width, height))
    return sizes


@torch.no_grad()
def generate_sized(
    pipeline: Any, prompts: Sequence[str], sizes: Sequence[Size], n: int, options: SamplingOptions
) -> list[torch.Tensor]:
    """n images of each prompt at its size: one n x C x height x width tensor in [-1, 1] per
    prompt. pipeline: an ldm_train.diffusion.pipeline.Pipeline (its U-Net runs in eval mode and is
    put back as it was)."""
    rows: list[torch.Tensor | None] = [None] * len(prompts)
    for size in dict.fromkeys(sizes):  # each size once, in the order of first use
        indices = [i for i, s in enumerate(sizes) if s == size]
        images = pipeline.generate([prompts[i] for i in indices], n, options, size=size)
        for i, row in zip(indices, images.split(n), strict=True):
            rows[i] = row
    return rows


def caption_sizes(prompts: Sequence[Any]) -> dict[str, Size]:
    """{caption: (width, height)} of the data.prompts entries that carry a size (both sides)."""
    sized = [p for p in prompts if isinstance(p, Mapping) and {"width", "height"} & set(p)]
    return {p["caption"]: size for p, size in zip(sized, prompt_sizes(sized, 0), strict=True)}


@torch.no_grad()
def sample_sized(
    pipeline: Any,
    prompts: Sequence[str],
    seeds: Sequence[int],
    sizes: Sequence[Size | None],
    canvas: Size,
) -> torch.Tensor:
    """prompts[i] from the noise of seeds[i] at sizes[i] (None: the pipeline's square), in the
    order given, with the pipeline's sampling options, each padded with white to canvas (width,
    height) so that they stack: the validation grid's images, drawn with the module's weights."""
    images: list[torch.Tensor | None] = [None] * len(prompts)
    for size in dict.fromkeys(sizes):  # each size once, in the order of first use
        indices = [i for i, s in enumerate(sizes) if s == size]
        shape = latent_shape(pipeline.unet, pipeline.vae, size) if size else pipeline.latent_shape
        drawn = sample(
            pipeline.unet,
            dict(pipeline.scheduler.config),
            [prompts[i] for i in indices],
            [seeds[i] for i in indices],
            shape,
            pipeline.sampling,
            vae=pipeline.vae,
            text_encoder=pipeline.text_encoder,
        )
        for i, image in zip(indices, pad_to(drawn, canvas[1], canvas[0]), strict=True):
            images[i] = image
    return torch.stack(images)


def pad_to(images: torch.Tensor, height: int, width: int, value: float = 1.0) -> torch.Tensor:
    """B x C x h x w -> B x C x height x width, centred, the margin filled with `value`."""
    dh, dw = height - images.shape[-2], width - images.shape[-1]
    return F.pad(images, (dw // 2, dw - dw // 2, dh // 2, dh - dh // 2), value=value)


def sized_grid(rows: Sequence[torch.Tensor], max_columns: int = 8) -> torch.Tensor:
    """image_grid for rows of different image sizes: each padded with white to the largest."""
    height = max(row.shape[-2] for row in rows)
    width = max(row.shape[-1] for row in rows)
    return image_grid([pad_to(row, height, width) for row in rows], max_columns=max_columns)


def save_rows(
    rows: Sequence[torch.Tensor], prompts: Sequence[str], seed: int, out_dir: str | Path
) -> list[Path]:
    """One PNG per image (<prompt#>-<image#>.png, at its own size), images.json (file, prompt,
    seed, width, height) and grid.png (a row per prompt), as ldm_train.generate writes them."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths, listing = [], []
    for i, (prompt, row) in enumerate(zip(prompts, rows, strict=True)):
        height, width = row.shape[-2:]
        for j, image in enumerate(row):
            path = out_dir / f"{i:03d}-{j:03d}.png"
            save_image((image + 1) / 2, path)
            paths.append(path)
            entry = {"file": path.name, "prompt": prompt, "seed": seed + j}
            listing.append({**entry, "width": width, "height": height})
    (out_dir / "images.json").write_text(json.dumps(listing, indent=2))
    save_image(sized_grid(rows, max_columns=max(len(row) for row in rows)), out_dir / "grid.png")
    return paths
