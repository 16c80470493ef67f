"""The diffusers pipeline class an export folder is (its model_index.json), written by
ldm_train.diffusion.pipeline, which owns the folder:

    U-Net (epsilon, v_prediction or flow)  StableDiffusionPipeline (vae, text_encoder, tokenizer,
                                           unet, scheduler)
    SD3Transformer2DModel                  StableDiffusion3Pipeline (transformer, scheduler, vae,
                                           text_encoder, tokenizer; its second and third text
                                           encoders null)

StableDiffusion3Pipeline encodes prompts with two CLIP encoders and a T5 (their penultimate layers
side by side, T5 tokens after): our transformer reads one text encoder, so its prompts go in as
prompt_embeds / pooled_prompt_embeds (README "Use your model in diffusers"): the text encoder's
last_hidden_state and pooler_output, which the folder's text_encoder/ + tokenizer/ compute.
A flow U-Net's scheduler/ is FlowMatchEulerDiscreteScheduler, which StableDiffusionPipeline cannot
drive (it has no init_noise_sigma, no scale_model_input): the pipeline loads, and samples once its
scheduler is DPM-Solver++ on flow sigmas (ldm_train.diffusion.schedule.build_flow_sampler).
"""

from __future__ import annotations

import copy
from pathlib import Path

from diffusers import AutoencoderKL, StableDiffusion3Pipeline, StableDiffusionPipeline
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from ldm_train.diffusion.conditioning import TextEncoder
from ldm_train.diffusion.denoiser import Denoiser, is_transformer


def pipeline_class(net: Denoiser) -> type:
    return StableDiffusion3Pipeline if is_transformer(net) else StableDiffusionPipeline


def diffusers_problem(
    net: Denoiser,
    vae: AutoencoderKL | None,
    text_encoder: TextEncoder | None,
    converted: tuple | str | None,
) -> str | None:
    """Why the diffusers pipeline of this net cannot hold these parts; None if it can."""
    name = pipeline_class(net).__name__
    if vae is None:
        return f"it works in pixel space (stage.vae=null) and {name} needs a VAE"
    if text_encoder is None:
        return f"it is unconditional (stage.text_encoder=null); {name} needs one"
    if isinstance(converted, str):
        return converted
    if vae.config.get("shift_factor") and not is_transformer(net):
        return "its VAE has a shift_factor, which StableDiffusionPipeline does not apply"
    return None


def pipeline_vae(net: Denoiser, vae: AutoencoderKL) -> AutoencoderKL:
    """The VAE as the pipeline folder holds it: StableDiffusion3Pipeline adds the VAE's
    shift_factor when decoding, so one without it gets 0.0 (the same latents)."""
    if not is_transformer(net) or vae.config.get("shift_factor") is not None:
        return vae
    shifted = copy.copy(vae)  # the same weights; only the copy's config changes
    shifted.register_to_config(shift_factor=0.0)
    return shifted


def write_model_index(
    out_dir: Path,
    net: Denoiser,
    vae: AutoencoderKL,
    sampler: SchedulerMixin,
    converted: tuple,
) -> None:
    """model_index.json of the pipeline class of this net (the parts are saved by the caller)."""
    text_model, tokenizer = converted
    shared = {"vae": vae, "text_encoder": text_model, "tokenizer": tokenizer, "scheduler": sampler}
    if is_transformer(net):  # SD3's second and third text encoders: none
        nothing = dict.fromkeys(("text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3"))
        pipeline = StableDiffusion3Pipeline(transformer=net, **shared, **nothing)
    else:
        no_checker = {"safety_checker": None, "feature_extractor": None}
        pipeline = StableDiffusionPipeline(
            unet=net, **shared, **no_checker, requires_safety_checker=False
        )
    pipeline.save_config(out_dir)
