"""model.pretrained: each stage starts from existing weights (a tiny Stable Diffusion pipeline
folder, its unet/ or vae/, a CLIP export, an open_clip weights file). The first step starts from
exactly those weights; a resumed run continues from its checkpoint instead, resume=never from the
weights again; the architecture comes from the weights' own config; wrong kinds and mismatches are
one line. SD's transformers text encoder also feeds the latent cache."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import lightning as L
import pytest
import safetensors.torch
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ldm_train.cache_latents import cache_latents
from ldm_train.data.datamodule import WebDataModule
from ldm_train.errors import UserError
from ldm_train.formats.clip_model import save_clip
from ldm_train.train import build, train

pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log")

UNET_FILE = "unet/diffusion_pytorch_model.safetensors"
VAE_FILE = "vae/diffusion_pytorch_model.safetensors"


class FirstState(L.Callback):
    """A copy of the trained net's weights just before the first step of a fit, and its number."""

    def __init__(self) -> None:
        self.state: dict[str, torch.Tensor] | None = None
        self.step: int | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.state is None:
            self.state = {k: v.detach().clone() for k, v in pl_module.net.state_dict().items()}
            self.step = trainer.global_step


RECORD = f"+callbacks.first_state={{_target_:{__name__}.FirstState}}"
QUICK = ("logger=none", "trainer.limit_val_batches=1", "trainer.max_steps=1", RECORD)


def first_state(objects: dict) -> FirstState:
    return next(c for c in objects["trainer"].callbacks if isinstance(c, FirstState))


def equal_states(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> bool:
    return state.keys() == expected.keys() and all(
        torch.equal(state[k], expected[k]) for k in state
    )


def unet_run(make_cfg, sd: Path, *overrides: str):
    return make_cfg(
        "stage=unet",
        f"stage.vae={sd}",
        f"stage.text_encoder={sd}",
        f"model.pretrained={sd}",
        "stage.module.validation.samples_per_prompt=1",
        "stage.module.validation.sampling.steps=2",
        *QUICK,
        *overrides,
    )


def test_unet_starts_from_the_pipeline_and_a_resumed_run_from_its_checkpoint(tiny_sd, make_cfg):
    sd = tiny_sd[1]
    pretrained = safetensors.torch.load_file(sd / UNET_FILE)
    _, objects = train(unet_run(make_cfg, sd, "trainer.max_steps=2"))
    recorded = first_state(objects)
    assert recorded.step == 0 and equal_states(recorded.state, pretrained)
    assert objects["module"].net.config.block_out_channels == [8, 16]  # its config's, not tiny's
    checkpoint = torch.load(objects["run_dir"] / "checkpoints" / "last.ckpt", weights_only=True)
    trained = {k.removeprefix("net."): v for k, v in checkpoint["current_model_state"].items()}

    _, objects = train(unet_run(make_cfg, sd, "trainer.max_steps=4"))  # resume=auto
    recorded = first_state(objects)
    assert recorded.step == 2 and equal_states(recorded.state, trained)
    assert not equal_states(recorded.state, pretrained)

    _, objects = train(unet_run(make_cfg, sd, "trainer.max_steps=2", "resume=never"))
    recorded = first_state(objects)
    assert recorded.step == 0 and equal_states(recorded.state, pretrained)
    assert objects["trainer"].global_step == 2  # a fresh run: step 0 to 2 again


def test_unet_starts_from_a_unet_folder(tiny_sd, make_cfg):
    sd = tiny_sd[1]
    cfg = unet_run(make_cfg, sd, f"model.pretrained={sd / 'unet'}")
    module = instantiate(cfg.stage.module)
    assert module.net.training  # from_pretrained's eval mode is not kept
    assert equal_states(module.net.state_dict(), safetensors.torch.load_file(sd / UNET_FILE))


@pytest.mark.parametrize("part", ["pipeline", "vae_folder"])
def test_vae_starts_from_a_pipeline_or_a_vae_folder(tiny_sd, make_cfg, part):
    sd = tiny_sd[1]
    source = sd if part == "pipeline" else sd / "vae"
    # The tiny preset's posterior_logvar_init is an initialisation: not applied to these weights.
    cfg = make_cfg("stage=vae", f"model.pretrained={source}", *QUICK)
    assert cfg.model.posterior_logvar_init == -6.0
    _, objects = train(cfg)
    recorded = first_state(objects)
    assert recorded.step == 0
    assert equal_states(recorded.state, safetensors.torch.load_file(sd / VAE_FILE))


def test_clip_starts_from_an_export_with_its_own_card(make_open_clip, make_cfg, tmp_path):
    model, card = make_open_clip()  # text width 32, 3 layers: not the tiny preset's sizes
    export = save_clip(model, card, tmp_path / "clip", "tiny")
    assert "set model.context_length=24" in one_line_error(
        make_cfg("stage=clip", f"model.pretrained={export}")  # the tiny preset's 16 tokens
    )
    cfg = make_cfg("stage=clip", f"model.pretrained={export}", "model.context_length=24", *QUICK)
    _, objects = train(cfg)
    recorded = first_state(objects)
    weights = safetensors.torch.load_file(export / "open_clip_model.safetensors")
    assert recorded.step == 0 and equal_states(recorded.state, weights)
    assert objects["module"].model_cfg == card  # what its export writes


def test_clip_starts_from_a_weights_file_for_the_preset(make_open_clip, make_cfg, tmp_path):
    cfg = make_cfg("stage=clip")
    torch.manual_seed(1)
    preset = instantiate(cfg.model.net).model
    state = {k: v.contiguous() for k, v in preset.state_dict().items()}
    safetensors.torch.save_file(state, tmp_path / "weights.safetensors")
    module = instantiate(
        make_cfg("stage=clip", f"model.pretrained={tmp_path / 'weights.safetensors'}").stage.module
    )
    assert equal_states(module.net.state_dict(), state)
    # Weights of another card: one line naming the first difference.
    other, _ = make_open_clip()
    safetensors.torch.save_file(other.state_dict(), tmp_path / "other.safetensors")
    message = one_line_error(
        make_cfg("stage=clip", f"model.pretrained={tmp_path / 'other.safetensors'}")
    )
    assert "the weights do not fit the model card" in message and "of shape" in message


def one_line_error(cfg) -> str:
    with pytest.raises(UserError) as caught:
        build(cfg.stage.module)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_wrong_kinds_and_misfits_are_one_line_errors(tiny_sd, make_cfg, tmp_path):
    sd = tiny_sd[1]
    (tmp_path / "config_only").mkdir()
    shutil.copy(sd / "vae" / "config.json", tmp_path / "config_only")
    for stage, source, expected in [
        ("unet", sd / "vae", "is AutoencoderKL's, not UNet2DConditionModel's; stage=unet takes"),
        ("vae", sd / "unet", "is UNet2DConditionModel's, not AutoencoderKL's; stage=vae takes"),
        ("unet", tmp_path / "missing", "nothing there nor in unet/"),
        ("vae", sd / "text_encoder", "is clip_text_model's, not AutoencoderKL's"),
        ("clip", tmp_path / "missing", "not a CLIP export"),
        ("vae", tmp_path / "config_only", "no safetensors weights in"),
    ]:
        overrides = [f"stage.vae={sd}", f"stage.text_encoder={sd}"] if stage == "unet" else []
        cfg = make_cfg(f"stage={stage}", *overrides, f"model.pretrained={source}")
        assert expected in one_line_error(cfg), (stage, source)
    # A U-Net keeps its architecture: a pixel-space run cannot feed it 3 channels.
    cfg = make_cfg(
        "stage=unet", "stage.vae=null", f"stage.text_encoder={sd}", f"model.pretrained={sd}"
    )
    assert (
        "its UNet2DConditionModel has in_channels=4 but stage.vae's latent channels"
        in one_line_error(cfg)
    )


def test_sd_text_encoder_feeds_the_latent_cache(tiny_sd, make_cfg, tmp_path):
    sd = tiny_sd[1]
    cfg = unet_run(make_cfg, sd)
    info = cache_latents(cfg, tmp_path / "cache")
    plain = instantiate(cfg.stage.module)
    cached = instantiate(cfg.stage.module)
    image_batch = next(iter(WebDataModule.from_config(cfg.data).train_dataloader()))
    cfg.data.train_urls = info["train_urls"]
    cached_batch = next(iter(WebDataModule.from_config(cfg.data).train_dataloader()))
    assert cached_batch["key"] == image_batch["key"] and cached_batch["text"].shape[-1] == 32
    for batch_idx in (0, 1):  # different dropped captions: "" from SD's text encoder
        expected = plain.training_step(image_batch, batch_idx)
        assert torch.allclose(cached.training_step(cached_batch, batch_idx), expected, atol=1e-5)


def test_the_noise_schedule_comes_from_the_pretrained_pipeline_unless_set(
    tiny_sd, make_cfg, tmp_path
):
    """SD 2.x's 768 models predict v: fine-tuned from such a pipeline, the U-Net trains v without
    being told; a value the user sets wins."""
    sd = tmp_path / "sd-v"
    shutil.copytree(tiny_sd[1], sd)
    scheduler = sd / "scheduler" / "scheduler_config.json"
    config = json.loads(scheduler.read_text())  # DDIMScheduler's defaults: linear, 1e-4 .. 0.02
    scheduler.write_text(json.dumps(config | {"prediction_type": "v_prediction"}))

    def schedule(*overrides: str) -> dict:
        cfg = make_cfg("stage=unet", "model=unet/sd15", *overrides)  # the preset says epsilon
        return OmegaConf.to_container(cfg.stage.module.noise_scheduler, resolve=True)

    assert schedule()["prediction_type"] == "epsilon"
    taken = schedule(f"model.pretrained={sd}")
    assert taken["prediction_type"] == "v_prediction" and taken["beta_schedule"] == "linear"
    assert (taken["beta_start"], taken["beta_end"]) == (config["beta_start"], config["beta_end"])
    assert schedule(f"model.pretrained={sd / 'unet'}")["prediction_type"] == "v_prediction"
    told = schedule(f"model.pretrained={sd}", "model.prediction_type=epsilon")
    assert told["prediction_type"] == "epsilon"
    built = instantiate(
        make_cfg("stage=unet", f"model.pretrained={sd}").stage.module.noise_scheduler
    )
    assert built.config.prediction_type == "v_prediction"
    # A single file's original LDM config says it too (parameterization: v).
    original = tmp_path / "v2-inference-v.yaml"
    original.write_text("model:\n  params:\n    parameterization: v\n    linear_start: 0.001\n")
    weights = tmp_path / "unet.safetensors"
    weights.write_bytes(b"")
    from_yaml = schedule(f"model.pretrained={weights}", f"model.pretrained_config={original}")
    assert from_yaml["prediction_type"] == "v_prediction" and from_yaml["beta_start"] == 0.001


@pytest.mark.parametrize("part", ["unet", "vae"])
def test_a_single_file_checkpoint_loads_through_diffusers(tiny_sd, make_cfg, tmp_path, part):
    """The one weights file diffusers' save_pretrained wrote, and a .ckpt holding it as a
    state_dict, with the architecture from a folder of the same model: from_single_file, from disk
    only (no other file of that folder is read for the weights)."""
    sd = tiny_sd[1]
    single = sd / part / "diffusion_pytorch_model.safetensors"  # saved by diffusers
    weights = safetensors.torch.load_file(single)
    ckpt = tmp_path / f"{part}.ckpt"
    torch.save({"state_dict": weights}, ckpt)
    upstream = [f"stage.vae={sd}", f"stage.text_encoder={sd}"] if part == "unet" else []
    for source in (single, ckpt):
        cfg = make_cfg(
            f"stage={part}",
            *upstream,
            f"model.pretrained={source}",
            f"model.pretrained_config={sd}",
        )
        module = instantiate(cfg.stage.module)
        assert equal_states(module.net.state_dict(), weights) and module.net.training
    message = one_line_error(make_cfg(f"stage={part}", *upstream, f"model.pretrained={ckpt}"))
    assert "no model.pretrained_config" in message and "model.pretrained_config=FOLDER" in message
