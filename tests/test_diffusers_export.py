"""The U-Net's export is a diffusers StableDiffusionPipeline: diffusers loads every weight of it and
samples as ldm_train.generate does (each sampler, with and without guidance), also for a U-Net
fine-tuned on Stable Diffusion's own parts; folders exported before model_index.json still load;
pixel-space and unconditional exports stay ldm_train's own format; evaluate finds a CLIP."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict
from pathlib import Path

import pytest
import safetensors.torch
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
)
from omegaconf import OmegaConf

from ldm_train.diffusion.pipeline import Pipeline
from ldm_train.diffusion.sampler import SamplingOptions, per_prompt
from ldm_train.diffusion.schedule import build_noise_scheduler
from ldm_train.errors import UserError
from ldm_train.evaluate import clip_folder
from ldm_train.train import train

pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log")

PROMPTS = ["a large red circle in the center on a blue background", "a small green triangle"]
# The README's lines for another sampler: pipe.scheduler = <Class>.from_config(pipe.scheduler.config)
SCHEDULERS = {
    "ddim": DDIMScheduler,
    "euler": EulerDiscreteScheduler,
    "dpmpp": DPMSolverMultistepScheduler,
}


def from_pretrained(export: Path) -> StableDiffusionPipeline:
    return StableDiffusionPipeline.from_pretrained(
        export, safety_checker=None, requires_safety_checker=False, local_files_only=True
    )


def generators(n: int, seed: int) -> list[torch.Generator]:
    """As ldm_train.generate seeds n images of each of PROMPTS: image j of every prompt from
    seed + j."""
    return [torch.Generator("cpu").manual_seed(s) for s in per_prompt(PROMPTS, n, seed)[1]]


def generate_images(export: Path, n: int, options: SamplingOptions) -> torch.Tensor:
    """The images of PROMPTS, n each, in [0, 1], that `python -m ldm_train.generate` draws."""
    return (Pipeline.load(export).generate(PROMPTS, n, options) + 1) / 2


def diffusers_images(
    pipe: StableDiffusionPipeline, image_size: int, n: int, options: SamplingOptions
) -> torch.Tensor:
    """diffusers' images in [0, 1], each from the generator of the seed ldm_train gives it."""
    sampler = options.sampler or "ddim"  # None: the model's default, DDIM for epsilon and v
    pipe.scheduler = SCHEDULERS[sampler].from_config(pipe.scheduler.config)
    return pipe(
        PROMPTS,
        height=image_size,
        width=image_size,
        num_images_per_prompt=n,
        generator=generators(n, options.seed),
        num_inference_steps=options.steps,
        guidance_scale=options.guidance,
        output_type="pt",
    ).images


def assert_samples_as_generate(export: Path, options: SamplingOptions) -> torch.Tensor:
    ours = generate_images(export, 2, options)
    theirs = diffusers_images(from_pretrained(export), 32, 2, options)
    assert theirs.shape == ours.shape == (4, 3, 32, 32)
    assert (theirs - ours).abs().max() <= 1e-3
    return ours


def assert_same_weights(module: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    state = module.state_dict()
    assert state.keys() == expected.keys()  # nothing missing, nothing unexpected
    assert all(torch.equal(state[k], v.to(state[k].device)) for k, v in expected.items())


def test_diffusers_loads_every_weight_of_the_export(trained):
    module, export = trained
    index = json.loads((export / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    pipe = from_pretrained(export)
    ours = Pipeline.load(export)
    assert_same_weights(pipe.unet, module.net.state_dict())  # the EMA weights the run ended with
    assert_same_weights(pipe.vae, ours.vae.state_dict())
    assert_same_weights(pipe.text_encoder, ours.text_encoder.model.state_dict())
    assert pipe.tokenizer.model_max_length == 24 and pipe.tokenizer.pad_token_id == 0
    assert isinstance(pipe.scheduler, DDIMScheduler)  # the export's default sampler
    assert pipe.scheduler.config.timestep_spacing == "trailing"
    # The text encoder diffusers reads encodes as the one the U-Net was trained with.
    hidden_states = pipe.encode_prompt(PROMPTS, "cpu", 1, False)[0]
    trained_with = module.conditioning.text_encoder(module.device)
    torch.testing.assert_close(hidden_states, trained_with(PROMPTS)[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("guidance", [1.0, 3.0])
@pytest.mark.parametrize("sampler", ["ddim", "euler", "dpmpp"])
def test_diffusers_samples_as_generate(trained, sampler, guidance):
    options = SamplingOptions(sampler=sampler, steps=4, guidance=guidance, seed=3)
    images = assert_samples_as_generate(trained[1], options)
    if guidance > 1:  # guidance changes the images: both ran the unconditional batch
        unguided = (
            Pipeline.load(trained[1]).generate(
                PROMPTS, 2, SamplingOptions(sampler=sampler, steps=4, guidance=1.0, seed=3)
            )
            + 1
        ) / 2
        assert (images - unguided).abs().max() > 1e-3


def test_guidance_below_one_is_refused_as_diffusers_ignores_it():
    with pytest.raises(UserError, match=r"guidance=0.5 must be a finite number from 1 to"):
        SamplingOptions(guidance=0.5)


def test_a_fine_tuned_stable_diffusion_exports_as_diffusers_samples_it(tiny_sd, make_cfg):
    """SD's VAE, its transformers text encoder and its U-Net as the start; caption dropout, EMA."""
    sd = tiny_sd[1]
    cfg = make_cfg(
        "stage=unet",
        f"stage.vae={sd}",
        f"stage.text_encoder={sd}",
        f"model.pretrained={sd}",
        "stage.module.conditioning.caption_dropout=0.5",
        "stage.module.validation.samples_per_prompt=1",
        "stage.module.validation.sampling.steps=2",
        "trainer.max_steps=2",
        "logger=none",
    )
    _, objects = train(cfg)
    export = objects["export_dir"]
    assert (export / "model_index.json").is_file()
    # The text encoder leaves as it came, padding with SD 1.x's end token.
    assert from_pretrained(export).tokenizer.pad_token == "<|endoftext|>"
    assert_samples_as_generate(export, SamplingOptions(steps=3, guidance=2.0))


def write_old_style_export(module, upstream: dict[str, Path], folder: Path) -> Path:
    """What save wrote before model_index.json: the training scheduler in scheduler/, the CLIP
    folder as text_encoder/."""
    module.net.save_pretrained(folder / "unet")
    module.noise_scheduler.save_pretrained(folder / "scheduler")
    shutil.copytree(upstream["vae"], folder / "vae")
    shutil.copytree(upstream["clip"], folder / "text_encoder")
    index = {
        "unet": "unet",
        "scheduler": "scheduler",
        "vae": "vae",
        "text_encoder": "text_encoder",
        "text_layer": "last",
        "image_size": 32,
        "sampling": asdict(SamplingOptions(steps=25)),
        "prompts": PROMPTS,
    }
    (folder / "ldm_train_pipeline.json").write_text(json.dumps(index))
    return folder


def test_exports_from_before_model_index_still_load_and_convert(trained, upstream, tmp_path):
    module, export = trained
    old = write_old_style_export(module, upstream, tmp_path / "old")
    pipeline = Pipeline.load(old)
    assert type(pipeline.scheduler).__name__ == "DDPMScheduler"  # the training scheduler
    options = SamplingOptions(steps=3, guidance=3.0, seed=1)
    images = pipeline.generate(PROMPTS, 2, options)
    torch.testing.assert_close(images, module.pipeline().generate(PROMPTS, 2, options))
    new = Pipeline.load(export).generate(PROMPTS, 2, options)
    assert (images - new).abs().max() <= 1e-3  # open_clip's tower vs its CLIPTextModel
    converted = pipeline.save(tmp_path / "converted")  # loading and saving converts it
    assert (converted / "model_index.json").is_file()
    assert_samples_as_generate(converted, options)


@pytest.mark.parametrize("kind", ["pixel_space", "unconditional"])
def test_what_diffusers_cannot_hold_is_our_own_format(trained, kind, tmp_path, caplog, make_unet):
    parts = Pipeline.load(trained[1])
    pixel = kind == "pixel_space"
    torch.manual_seed(0)
    pipeline = Pipeline(
        unet=make_unet(3 if pixel else 4).eval(),
        scheduler=build_noise_scheduler(),
        vae=None if pixel else parts.vae,
        text_encoder=parts.text_encoder if pixel else None,
        image_size=8 if pixel else 32,
    )
    with caplog.at_level(logging.INFO, logger="ldm_train.diffusion.pipeline"):
        export = pipeline.save(tmp_path / kind)
    (line,) = [r.getMessage() for r in caplog.records if "own format" in r.getMessage()]
    assert ("pixel space" if pixel else "unconditional") in line and "\n" not in line
    assert not (export / "model_index.json").exists()
    assert (export / "tokenizer").is_dir() == pixel  # a text encoder in transformers' format
    options = SamplingOptions(steps=3, guidance=2.0)
    loaded = Pipeline.load(export)
    prompts = ["a red circle"] if pixel else [""]
    torch.testing.assert_close(
        loaded.generate(prompts, 2, options), pipeline.generate(prompts, 2, options)
    )


def test_a_new_export_replaces_an_old_one_in_the_same_folder(trained, upstream, tmp_path):
    module, _ = trained
    folder = write_old_style_export(module, upstream, tmp_path / "export")
    Pipeline.load(folder).save(folder)
    assert not (folder / "text_encoder" / "open_clip_config.json").exists()  # not stale
    assert (folder / "text_encoder" / "config.json").is_file()


def test_evaluate_finds_a_clip_when_the_export_carries_none(trained, upstream, tmp_path):
    export = trained[1]
    run_config = OmegaConf.load(export.parent / "config.yaml")  # the run's: its stage=clip export
    assert clip_folder(None, export, run_config) == upstream["clip"]
    assert clip_folder(None, export, OmegaConf.create({})) is None
    assert clip_folder(str(tmp_path), export, run_config) == tmp_path  # --clip wins
    old = write_old_style_export(trained[0], upstream, tmp_path / "old")
    assert clip_folder(None, old, OmegaConf.create({})) == (old / "text_encoder").resolve()


def test_exported_weights_are_safetensors(trained):
    export = trained[1]
    for part in ("unet", "vae", "text_encoder"):
        files = [p.name for p in (export / part).iterdir() if p.suffix in (".bin", ".safetensors")]
        assert files and all(name.endswith(".safetensors") for name in files), files
        safetensors.torch.load_file(export / part / files[0])


@pytest.mark.parametrize("part", ["unet", "tokenizer"])
def test_index_paths_stay_inside_the_export(trained, part, tmp_path):
    export = shutil.copytree(trained[1], tmp_path / "export")
    shutil.copytree(export / part, tmp_path / "elsewhere")
    index = json.loads((export / "ldm_train_pipeline.json").read_text())
    (export / "ldm_train_pipeline.json").write_text(json.dumps({**index, part: "../elsewhere"}))
    with pytest.raises(UserError, match=f"{part}='../elsewhere' is not a folder inside the export"):
        Pipeline.load(export)
