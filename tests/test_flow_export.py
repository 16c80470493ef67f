"""The new objective x network exports (a flow U-Net, a flow transformer) load in diffusers without
remote code, and diffusers' documented routes draw the images `python -m ldm_train.generate` draws
(within 1e-3 on [0, 1] pixels): a flow U-Net through StableDiffusionPipeline with DPM-Solver++ on
flow sigmas, or the Euler loop with the export's components; the transformer through
StableDiffusion3Pipeline with the text encoder's hidden states as prompt_embeds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import train_tiny_unet
from diffusers import (
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
)
from test_diffusers_export import PROMPTS, generate_images, generators

from ldm_train.diffusion.sampler import SamplingOptions, per_prompt
from ldm_train.generate import main as generate_main

pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log")

N = 2


@pytest.fixture(scope="module")
def flow_unet(tmp_path_factory, tiny_overrides, unet_overrides) -> tuple:
    """(stage, export): a U-Net trained 2 steps with flow matching, logit-normal timesteps."""
    return train_tiny_unet(
        tmp_path_factory.mktemp("flow"),
        tiny_overrides,
        unet_overrides,
        "model.prediction_type=flow",
        "model.snr_gamma=null",
        "stage.module.loss.timesteps=logit_normal",
        "stage.module.noise_scheduler.shift=2.0",
    )


@pytest.fixture(scope="module")
def transformer(tmp_path_factory, tiny_overrides, unet_overrides) -> tuple:
    """(stage, export): the dit_tiny transformer (flow) trained 2 steps, 2 blocks, on 2x2 patches
    (the preset's are 1x1: any latent size is whole patches; 2x2 ones show the refusal of a size
    that is not)."""
    return train_tiny_unet(
        tmp_path_factory.mktemp("dit"),
        tiny_overrides,
        unet_overrides,
        "model=unet/dit_tiny",
        "model.net.num_layers=2",
        "model.net.patch_size=2",
    )


def dpm_flow(shift: float) -> DPMSolverMultistepScheduler:
    """README: DPM-Solver++ (2M) on flow sigmas, what --sampler dpmpp builds for a flow model."""
    return DPMSolverMultistepScheduler(
        algorithm_type="dpmsolver++",
        solver_order=2,
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=shift,
        final_sigmas_type="zero",
    )


@torch.no_grad()
def euler_loop(export: Path, options: SamplingOptions) -> torch.Tensor:
    """README: a flow U-Net with diffusers' components, the scheduler of the export's scheduler/."""
    pipe = StableDiffusionPipeline.from_pretrained(
        export, safety_checker=None, local_files_only=True
    )
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(export / "scheduler")
    guided = options.guidance > 1
    cond, uncond = pipe.encode_prompt(PROMPTS, "cpu", N, guided)
    context = torch.cat([uncond, cond]) if guided else cond
    latents = torch.cat([torch.randn(1, 4, 8, 8, generator=g) for g in generators(N, options.seed)])
    scheduler.set_timesteps(options.steps)
    for t in scheduler.timesteps:
        velocity = pipe.unet(torch.cat([latents] * (1 + guided)), t, context).sample
        if guided:
            unconditional, conditional = velocity.chunk(2)
            velocity = unconditional + options.guidance * (conditional - unconditional)
        latents = scheduler.step(velocity, t, latents).prev_sample
    images = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    return pipe.image_processor.postprocess(images, output_type="pt")


def test_stable_diffusion_pipeline_cannot_drive_the_flow_scheduler(flow_unet):
    pipe = StableDiffusionPipeline.from_pretrained(
        flow_unet[1], safety_checker=None, local_files_only=True
    )
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    assert pipe.scheduler.config.shift == 2.0
    with pytest.raises(AttributeError, match="init_noise_sigma"):
        pipe(PROMPTS[:1], height=32, width=32, num_inference_steps=2)


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_flow_unet_samples_in_diffusers_as_generate(flow_unet, guidance):
    export = flow_unet[1]
    euler = SamplingOptions(steps=4, guidance=guidance, seed=3)  # the export's default: euler
    theirs = euler_loop(export, euler)
    assert (theirs - generate_images(export, N, euler)).abs().max() <= 1e-3
    pipe = StableDiffusionPipeline.from_pretrained(
        export, safety_checker=None, local_files_only=True
    )
    pipe.scheduler = dpm_flow(pipe.scheduler.config.shift)
    dpmpp = SamplingOptions(sampler="dpmpp", steps=4, guidance=guidance, seed=3)
    images = pipe(
        PROMPTS,
        height=32,
        width=32,
        num_images_per_prompt=N,
        num_inference_steps=4,
        guidance_scale=guidance,
        generator=generators(N, 3),
        output_type="pt",
    ).images
    assert (images - generate_images(export, N, dpmpp)).abs().max() <= 1e-3
    assert (images - theirs).abs().max() > 1e-3  # two samplers: two sets of images


def sd3_pipeline(export: Path) -> StableDiffusion3Pipeline:
    """README: the export as a StableDiffusion3Pipeline, without SD3's second and third text encoders."""
    return StableDiffusion3Pipeline.from_pretrained(
        export,
        text_encoder_2=None,
        tokenizer_2=None,
        text_encoder_3=None,
        tokenizer_3=None,
        local_files_only=True,
    )


def embed(pipe: StableDiffusion3Pipeline, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """README: (prompt_embeds, pooled_prompt_embeds) from the export's text encoder."""
    ids = pipe.tokenizer(
        prompts,
        padding="max_length",
        max_length=pipe.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    output = pipe.text_encoder(ids)
    return output.last_hidden_state, output.pooler_output


def test_the_transformer_export_loads_in_diffusers(transformer):
    module, export = transformer
    index = json.loads((export / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline"
    assert index["transformer"] == ["diffusers", "SD3Transformer2DModel"]
    net = SD3Transformer2DModel.from_pretrained(export / "transformer", local_files_only=True)
    state = net.state_dict()
    assert all(torch.equal(state[k], v) for k, v in module.net.state_dict().items())
    pipe = sd3_pipeline(export)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    assert pipe.vae.config.shift_factor == 0.0  # what SD3's pipeline adds when decoding
    # The text encoder diffusers reads gives what the transformer was trained with.
    hidden_states, pooled = embed(pipe, PROMPTS)
    conditioning = module.conditioning
    context = conditioning.context(PROMPTS, 32, module.device)
    torch.testing.assert_close(hidden_states, context, atol=1e-5, rtol=0)
    torch.testing.assert_close(pooled, conditioning.pooled(context, PROMPTS), atol=1e-5, rtol=0)


@pytest.mark.parametrize("guidance", [1.0, 3.0])
@pytest.mark.parametrize("sampler", ["euler", "heun", "dpmpp"])
def test_stable_diffusion_3_pipeline_samples_as_generate(transformer, sampler, guidance):
    export = transformer[1]
    pipe = sd3_pipeline(export)
    shift = pipe.scheduler.config.shift
    if sampler == "heun":
        pipe.scheduler = FlowMatchHeunDiscreteScheduler(shift=shift)
    elif sampler == "dpmpp":
        pipe.scheduler = dpm_flow(shift)
    texts = per_prompt(PROMPTS, N, 0)[0]
    (prompt_embeds, pooled), (negative, negative_pooled) = embed(pipe, texts), embed(pipe, [""] * 4)
    images = pipe(
        prompt_embeds=prompt_embeds,
        pooled_prompt_embeds=pooled,
        negative_prompt_embeds=negative,
        negative_pooled_prompt_embeds=negative_pooled,
        height=32,
        width=32,
        num_inference_steps=3,
        guidance_scale=guidance,
        generator=generators(N, 5),
        output_type="pt",
    ).images
    options = SamplingOptions(sampler=sampler, steps=3, guidance=guidance, seed=5)
    generated = generate_images(export, N, options)
    assert images.shape == generated.shape == (4, 3, 32, 32)
    assert (images - generated).abs().max() <= 1e-3
    if guidance > 1:
        unguided = generate_images(export, N, SamplingOptions(sampler=sampler, steps=3, seed=5))
        assert (generated - unguided).abs().max() > 1e-3


def test_generate_draws_from_the_transformer_export_at_another_size(transformer, tmp_path):
    """python -m ldm_train.generate: the export's default sampler (euler), a non-square size in
    whole patches; a size that is not refused with one line."""
    out = tmp_path / "samples"
    args = [str(transformer[1]), "--prompt", PROMPTS[0], "--n", "1", "--steps", "2"]
    assert generate_main([*args, "--width", "48", "--height", "32", "--out", str(out)]) == 0
    assert (out / "grid.png").is_file()
    assert generate_main([*args, "--width", "36", "--out", str(out)]) == 2
    assert generate_main([*args, "--sampler", "ddim", "--out", str(out)]) == 2


def test_a_transformer_export_is_a_starting_point(transformer, make_cfg):
    """model.pretrained with a transformer preset: the export's transformer/, as it left."""
    from ldm_train.pretrained import unet_net

    module, export = transformer
    cfg = make_cfg("stage=unet", "model=unet/dit_tiny", f"model.pretrained={export}")
    pretrained = unet_net(cfg.model.net, cfg.model.pretrained)
    net = pretrained.net
    assert isinstance(net, SD3Transformer2DModel) and net.training
    assert pretrained.source == str(export / "transformer")
    state = net.state_dict()
    assert all(torch.equal(state[k], v) for k, v in module.net.state_dict().items())
