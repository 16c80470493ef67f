"""stage.text_encoder from existing weights: each kind of folder or file loads as a frozen text
encoder with one surface, encodes as its own library does (open_clip; diffusers' StableDiffusionPipeline),
takes "" and leaves as a transformers CLIPTextModel + CLIPTokenizer; anything else is one line."""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import safetensors.torch
import torch
from diffusers import StableDiffusionPipeline
from hydra.utils import instantiate
from open_clip.push_to_hf_hub import save_config_for_hf
from transformers import CLIPTextModel

from ldm_train.data.datamodule import WebDataModule
from ldm_train.diffusion.text_encoder import (
    TEXT_LAYERS,
    ClipTextEncoder,
    TransformersTextEncoder,
    load_text_encoder,
)
from ldm_train.errors import UserError
from ldm_train.formats.clip_model import save_clip
from ldm_train.formats.transformers_clip import keep_layers, save_text_encoder

pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log")

CONTEXT = 24  # conftest's tiny open_clip card
CAPTIONS = ["", "a small red circle in the center on a blue background", "Two BLUE squares!"]
CARD_NAME = "ldm-train-test-tiny-clip"  # registered with open_clip for the NAME:FILE kind
OPEN_CLIP_KINDS = ["clip_export", "hub_folder", "named_safetensors", "named_checkpoint"]
TRANSFORMERS_KINDS = ["pipeline", "text_encoder_with_sibling_tokenizer", "text_model_folder"]


@pytest.fixture(scope="module")
def sources(tmp_path_factory, make_open_clip, tiny_sd) -> dict:
    """Every kind stage.text_encoder takes, written into tmp: {kind: spec}, and the originals."""
    root = tmp_path_factory.mktemp("text_encoders")
    model, card = make_open_clip()
    weights = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_clip(model, card, root / "clip_export", "tiny")
    (root / "hub").mkdir()
    save_config_for_hf(model, root / "hub" / "open_clip_config.json", model_config=card)
    torch.save(weights, root / "hub" / "open_clip_pytorch_model.bin")
    (root / f"{CARD_NAME}.json").write_text(json.dumps(card))
    open_clip.add_model_config(root / f"{CARD_NAME}.json")
    safetensors.torch.save_file(weights, root / "open_clip.safetensors")
    training_checkpoint = {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in weights.items()}}
    torch.save(training_checkpoint, root / "epoch_3.pt")
    pipeline, sd = tiny_sd
    pipeline.text_encoder.save_pretrained(root / "text_model")
    pipeline.tokenizer.save_pretrained(root / "text_model")
    specs = {
        "clip_export": root / "clip_export",
        "hub_folder": root / "hub",
        "named_safetensors": f"{CARD_NAME}:{root / 'open_clip.safetensors'}",
        "named_checkpoint": f"{CARD_NAME}:{root / 'epoch_3.pt'}",
        "pipeline": sd,
        "text_encoder_with_sibling_tokenizer": sd / "text_encoder",
        "text_model_folder": root / "text_model",
    }
    return {"specs": specs, "open_clip": model, "pipeline": pipeline, "root": root}


def expected_hidden_states(sources: dict, kind: str, layer: str) -> torch.Tensor:
    """What the library the weights come from gives for CAPTIONS."""
    if kind in OPEN_CLIP_KINDS:
        simple = open_clip.tokenizer.SimpleTokenizer(context_length=CONTEXT)
        return ClipTextEncoder(sources["open_clip"], simple, layer)(CAPTIONS)[0]
    # diffusers' own prompt encoding; its clip_skip reads CLIPTextModel.text_model, which
    # transformers 5 no longer has, so the penultimate layer is the model without its last one.
    pipeline = sources["pipeline"]
    full = pipeline.text_encoder
    pipeline.text_encoder = keep_layers(full, 3 if layer == "last" else 2)
    try:
        with torch.no_grad():
            return pipeline.encode_prompt(CAPTIONS, "cpu", 1, False)[0]
    finally:
        pipeline.text_encoder = full


@pytest.mark.parametrize("layer", TEXT_LAYERS)
@pytest.mark.parametrize("kind", OPEN_CLIP_KINDS + TRANSFORMERS_KINDS)
def test_each_kind_encodes_as_its_library(sources, kind, layer):
    encoder = load_text_encoder(sources["specs"][kind], layer)
    kind_class = ClipTextEncoder if kind in OPEN_CLIP_KINDS else TransformersTextEncoder
    assert isinstance(encoder, kind_class)
    assert (encoder.width, encoder.context_length, encoder.layer) == (32, CONTEXT, layer)
    hidden_states, pooled = encoder(CAPTIONS)
    assert hidden_states.shape == (len(CAPTIONS), CONTEXT, 32)
    assert pooled.shape == (len(CAPTIONS), encoder.embed_dim)
    assert torch.isfinite(hidden_states).all() and torch.isfinite(pooled).all()  # "" works
    expected = expected_hidden_states(sources, kind, layer)
    torch.testing.assert_close(hidden_states, expected, atol=1e-6, rtol=0)
    other_layer = expected_hidden_states(
        sources, kind, "penultimate" if layer == "last" else "last"
    )
    assert (other_layer - hidden_states).abs().max() > 1e-2
    # Frozen: stays in eval mode when the U-Net stage's Trainer switches its modules to training.
    encoder.train()
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())


@pytest.mark.parametrize("layer", TEXT_LAYERS)
@pytest.mark.parametrize("kind", ["clip_export", "pipeline"])
def test_to_transformers_encodes_as_the_encoder(sources, kind, layer):
    encoder = load_text_encoder(sources["specs"][kind], layer)
    model, tokenizer = encoder.to_transformers()
    assert isinstance(model, CLIPTextModel) and tokenizer.model_max_length == CONTEXT
    ids = tokenizer(
        CAPTIONS, padding="max_length", truncation=True, max_length=CONTEXT, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        got = model(ids).last_hidden_state
    torch.testing.assert_close(got, encoder(CAPTIONS)[0], atol=1e-5, rtol=0)
    if kind == "pipeline" and layer == "last":
        assert model is encoder.model  # as loaded


def one_line_error(path: str | Path) -> str:
    with pytest.raises(UserError) as caught:
        load_text_encoder(path)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_unknown_sources_are_one_line_errors_that_list_the_kinds(sources, tmp_path):
    root = sources["root"]
    sd_vae = sources["specs"]["pipeline"] / "vae"
    for path, found in ((sd_vae, "none of these kinds"), (tmp_path / "no", "nothing")):
        message = one_line_error(path)
        assert f"no CLIP export at {path}" in message and found in message
        for kind in ("open_clip_config.json", "NAME:FILE", "CLIPTextModel", "pipeline", "null"):
            assert kind in message
    (tmp_path / "lonely").mkdir()
    sources["pipeline"].text_encoder.save_pretrained(tmp_path / "lonely" / "text_encoder")
    assert "no tokenizer for the text encoder" in one_line_error(tmp_path / "lonely")
    weights = root / "open_clip.safetensors"
    assert "not one of open_clip's model cards" in one_line_error(f"ViT-Nope:{weights}")
    assert "no weights file at" in one_line_error(f"{CARD_NAME}:{tmp_path / 'missing.pt'}")
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")  # unpickling it would run code
    assert "weights_only" in one_line_error(f"{CARD_NAME}:{tmp_path / 'module.pt'}")
    message = one_line_error(f"RN50:{weights}")  # a real card: OpenAI's ResNet-50 CLIP
    assert "positional_embedding of shape (24, 32), not (77, 512)" in message


def test_unet_stage_trains_and_samples_with_a_transformers_text_encoder(sources, make_cfg):
    cfg = make_cfg(
        "stage=unet",
        "stage.vae=null",
        f"stage.text_encoder={sources['specs']['pipeline']}",
        "stage.text_layer=penultimate",
        "stage.module.validation.samples_per_prompt=1",
        "stage.module.validation.sampling.steps=2",
    )
    module = instantiate(cfg.stage.module)
    assert module.net.config.cross_attention_dim == 32
    batch = next(iter(WebDataModule.from_config(cfg.data).val_dataloader()))
    loss = module.training_step(batch, batch_idx=0)
    assert torch.isfinite(loss)
    images = module.pipeline().generate(
        ["", "a red circle"], 1
    )  # guidance: "" is the unconditional input
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()


def test_the_config_passes_the_name_and_file_spelling_through(sources, make_cfg):
    spec = sources["specs"]["named_safetensors"]
    cfg = make_cfg("stage=unet", f"stage.text_encoder={spec}", "stage.text_layer=penultimate")
    text_encoder = cfg.stage.module.conditioning.text_encoder
    assert text_encoder.path == spec  # Hydra reads NAME:/a/file unquoted
    encoder = instantiate(text_encoder)
    assert isinstance(encoder, ClipTextEncoder) and encoder.layer == "penultimate"


@pytest.mark.parametrize("layer", TEXT_LAYERS)
def test_written_text_encoder_loads_in_diffusers_and_encodes_as_ours(sources, tmp_path, layer):
    encoder = load_text_encoder(sources["specs"]["clip_export"], layer)
    text_model, tokenizer = encoder.to_transformers()
    sources["pipeline"].save_pretrained(tmp_path)
    save_text_encoder(text_model, tokenizer, tmp_path)  # replaces text_encoder/, tokenizer/
    pipeline = StableDiffusionPipeline.from_pretrained(tmp_path, local_files_only=True)
    loaded = pipeline.text_encoder.state_dict()  # every weight read, none left at random
    assert loaded.keys() == text_model.state_dict().keys()
    assert all(torch.equal(loaded[k], v) for k, v in text_model.state_dict().items())
    with torch.no_grad():
        got = pipeline.encode_prompt(CAPTIONS, "cpu", 1, False)[0]
    torch.testing.assert_close(got, encoder(CAPTIONS)[0], atol=1e-5, rtol=0)
