"""The latent denoiser of stage=unet: a diffusers UNet2DConditionModel (model=unet/tiny, small,
sd15) or SD3Transformer2DModel (the MMDiT of Stable Diffusion 3: model=unet/dit_tiny, dit_small,
dit_sd3_medium). Built here from its preset, with the sizes the upstream parts give, and called
one way by training, validation, sampling and export (`predict`).

Why SD3Transformer2DModel among diffusers' text-to-image transformers: it reads CLIP text hidden
states plus one pooled text vector, which is what our CLIP text tower gives (PixArt and Sana read
T5 / Gemma tokens with their masks); it is the model diffusers' flow-matching pipeline and
schedulers were written for (StableDiffusion3Pipeline, FlowMatchEulerDiscreteScheduler); and it
takes any latent size up to pos_embed_max_size patches, so aspect-ratio buckets work.

Conditioning of the transformer: encoder_hidden_states are the text encoder's hidden states (as
the U-Net's cross-attention reads them), pooled_projections the end token's hidden state (a
CLIPTextModel's pooler_output; CLIP's own text projection is linear, and the transformer's pooled
embedder starts with a linear layer, so nothing is lost by leaving it out).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import SD3Transformer2DModel, UNet2DConditionModel

from ldm_train.errors import UserError

Denoiser = UNet2DConditionModel | SD3Transformer2DModel
DenoiserFactory = Callable[..., Denoiser]
DENOISERS: tuple[type, ...] = (UNet2DConditionModel, SD3Transformer2DModel)


def denoiser_class(net: Denoiser | DenoiserFactory) -> type:
    """The class of a net or of its preset (a partial)."""
    return net if isinstance(net, type) else getattr(net, "func", type(net))


def is_transformer(net: Denoiser | DenoiserFactory | type) -> bool:
    cls = denoiser_class(net)
    return isinstance(cls, type) and issubclass(cls, SD3Transformer2DModel)


def context_key(net: Denoiser | DenoiserFactory | type) -> str:
    """The config key of the width of the text hidden states the net reads."""
    return "joint_attention_dim" if is_transformer(net) else "cross_attention_dim"


def context_width(net: Denoiser) -> int:
    return net.config[context_key(net)]


def patch_size(net: Denoiser) -> int:
    """Latent cells per token along a side: the transformer's patch size, 1 for a U-Net."""
    return net.config.get("patch_size", 1) if is_transformer(net) else 1


def predict(
    net: Denoiser,
    x: torch.Tensor,
    t: torch.Tensor,
    context: torch.Tensor,
    pooled: torch.Tensor | None = None,
) -> torch.Tensor:
    """The net's prediction for x at timesteps t (one per sample, or one for all) given the text
    hidden states (and, for the transformer, the pooled text vector)."""
    if not is_transformer(net):
        return net(x, t, encoder_hidden_states=context).sample
    t = t.expand(len(x)) if t.ndim == 0 else t
    if pooled is None:
        raise ValueError("SD3Transformer2DModel needs the pooled text vector")
    return net(
        hidden_states=x, timestep=t, encoder_hidden_states=context, pooled_projections=pooled
    ).sample


@dataclass(frozen=True)
class Sizes:
    """What the upstream parts fix: latent channels, the width of the text hidden states (also
    of the pooled vector), the latent side at data.image_size and the largest latent side of any
    bucket."""

    channels: int
    context_width: int
    latent_side: int
    max_latent_side: int


def preset_sizes(cls: type, preset: dict[str, Any], sizes: Sizes) -> dict[str, Any]:
    """The sizes a preset leaves null (they follow the upstream parts)."""
    if not issubclass(cls, SD3Transformer2DModel):
        fill = {"cross_attention_dim": sizes.context_width, "sample_size": sizes.latent_side}
        return fill | {"in_channels": sizes.channels, "out_channels": sizes.channels}
    patch = preset.get("patch_size") or 2
    heads, head_dim = preset.get("num_attention_heads"), preset.get("attention_head_dim")
    return {
        "in_channels": sizes.channels,
        "out_channels": sizes.channels,
        "joint_attention_dim": sizes.context_width,
        "pooled_projection_dim": sizes.context_width,
        # The text tokens join the image tokens' attention: the same width.
        "caption_projection_dim": heads * head_dim if heads and head_dim else None,
        "sample_size": sizes.latent_side,
        # Positions for twice the largest side the data has (larger sizes at generation).
        "pos_embed_max_size": 2 * -(-sizes.max_latent_side // patch),
    }


def build_denoiser(net: Denoiser | DenoiserFactory, sizes: Sizes) -> Denoiser:
    """The net, its null preset sizes filled from the upstream parts, or a ready-made net checked
    against them: one-line errors for a mismatch."""
    if not isinstance(net, DENOISERS):
        given = dict(getattr(net, "keywords", {}))
        fill = preset_sizes(denoiser_class(net), given, sizes)
        net = net(**{k: v for k, v in fill.items() if given.get(k) is None and v is not None})
    check_fits(net, sizes)
    return net


def check_fits(net: Denoiser, sizes: Sizes) -> None:
    where = "the VAE's latent channels" if sizes.channels != 3 else "the image channels"
    config = net.config
    if config.in_channels != sizes.channels:
        raise UserError(
            f"model.net.in_channels={config.in_channels} does not match {where} "
            f"({sizes.channels}); set model.net.in_channels={sizes.channels} (or null: follow the VAE)"
        )
    if config.out_channels != sizes.channels:
        raise UserError(
            f"model.net.out_channels={config.out_channels} must equal the input channels "
            f"({sizes.channels}): the net predicts noise of the input's shape"
        )
    key = context_key(net)
    if config[key] != sizes.context_width:
        raise UserError(
            f"model.net.{key}={config[key]} does not match the text encoder's width "
            f"({sizes.context_width}); set it to null to follow the text encoder"
        )
    if is_transformer(net):
        check_transformer_fits(net, sizes)


def check_transformer_fits(net: SD3Transformer2DModel, sizes: Sizes) -> None:
    config = net.config
    if config.pooled_projection_dim != sizes.context_width:
        raise UserError(
            f"model.net.pooled_projection_dim={config.pooled_projection_dim}: the pooled text "
            f"vector is the text encoder's end token ({sizes.context_width} wide); set it to null"
        )
    inner = config.num_attention_heads * config.attention_head_dim
    if config.caption_projection_dim != inner:
        raise UserError(
            f"model.net.caption_projection_dim={config.caption_projection_dim} must equal "
            f"num_attention_heads x attention_head_dim ({inner}): text and image tokens attend "
            "together; set it to null"
        )
    patch, most = config.patch_size, config.pos_embed_max_size
    if most is not None and sizes.max_latent_side > most * patch:
        raise UserError(
            f"model.net.pos_embed_max_size={most} patches of {patch} cover latents up to "
            f"{most * patch} cells a side; the data's largest is {sizes.max_latent_side}: set it "
            "to null (follow the data) or larger"
        )


def training_flops(
    net: Denoiser, latent_shape: tuple[int, ...], context_shape: tuple[int, ...]
) -> int:
    """FLOPs of one forward and backward pass of the net (its class and config) on a batch of
    these shapes, counted by Lightning's measure_flops on a meta-device copy (no memory, no
    compute). Set as the stage's flops_per_batch, Lightning's ThroughputMonitor logs FLOP/s and, on
    GPUs whose peak it knows, the model FLOP utilisation (train/device/mfu); the frozen encoders'
    FLOPs are not in it."""
    from lightning.fabric.utilities.throughput import measure_flops

    # Lightning's ThroughputMonitor asks under inference_mode: the backward needs it off.
    with torch.inference_mode(False), torch.enable_grad(), torch.device("meta"):
        copy = type(net).from_config(net.config)
        x, context = torch.empty(*latent_shape), torch.empty(*context_shape)
        pooled = torch.empty(context_shape[0], context_shape[-1])
        t = torch.zeros(latent_shape[0])
        return measure_flops(copy, lambda: predict(copy, x, t, context, pooled), torch.Tensor.sum)
