"""open_clip text tower -> transformers CLIPTextModel + CLIPTokenizer: the converted model gives our
hidden states for both layers, the tokenizer open_clip's ids, and both survive save/load."""

from __future__ import annotations

import copy
import json

import open_clip
import pytest
import safetensors.torch
import torch
from transformers import CLIPTextModel, CLIPTokenizer

from ldm_train.diffusion.text_encoder import ClipTextEncoder
from ldm_train.errors import UserError
from ldm_train.formats.transformers_clip import (
    clip_tokenizer,
    load_text_encoder_folders,
    save_text_encoder,
    to_clip_text_model,
)

CONTEXT = 24
CAPTIONS = [
    "",
    "a small red circle in the center on a blue background",
    "A BIG Green Square, Top-Left!!",
    "wow! what?! (yes) -- no... 3.14 + 42% @home #tag",
    "don't   stop\tbelieving\n it's 'quoted' \"twice\"",
    "café naïve über 日本語 😀",
    " ".join(f"word{i}" for i in range(40)),  # longer than the context: truncated, ends with EOT
]


def token_ids(tokenizer: CLIPTokenizer, captions: list[str]) -> torch.Tensor:
    """As diffusers' StableDiffusionPipeline tokenizes a prompt."""
    return tokenizer(
        captions,
        padding="max_length",
        truncation=True,
        max_length=tokenizer.model_max_length,
        return_tensors="pt",
    ).input_ids


@pytest.fixture(scope="module")
def tokenizer() -> CLIPTokenizer:
    return clip_tokenizer(CONTEXT)


def test_tokenizer_ids_equal_open_clips(tokenizer):
    expected = open_clip.tokenizer.SimpleTokenizer(context_length=CONTEXT)(CAPTIONS)
    assert torch.equal(token_ids(tokenizer, CAPTIONS), expected)
    assert tokenizer.model_max_length == CONTEXT
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("!", 0)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (49406, 49407)
    assert expected[-1, -1] == 49407 and (expected[0, 2:] == 0).all()  # truncated / padded


@pytest.mark.parametrize("quick_gelu", [False, True])
@pytest.mark.parametrize("layer", ["last", "penultimate"])
def test_converted_hidden_states_equal_ours(make_open_clip, tokenizer, layer, quick_gelu):
    model, _ = make_open_clip(quick_gelu=quick_gelu)
    ours = ClipTextEncoder(
        model, open_clip.tokenizer.SimpleTokenizer(context_length=CONTEXT), layer
    )
    expected, _ = ours(CAPTIONS)
    converted = to_clip_text_model(ours.model, layer)
    config = converted.config
    assert config.num_hidden_layers == (3 if layer == "last" else 2)
    assert config.hidden_act == ("quick_gelu" if quick_gelu else "gelu")
    assert (config.hidden_size, config.num_attention_heads, config.intermediate_size) == (
        32,
        2,
        128,
    )
    assert (config.max_position_embeddings, config.vocab_size) == (CONTEXT, 49408)
    with torch.no_grad():
        got = converted(token_ids(tokenizer, CAPTIONS)).last_hidden_state
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    # The same model would give another output for the other layer: the test can fail.
    other = ClipTextEncoder(
        ours.model, ours.tokenizer, "penultimate" if layer == "last" else "last"
    )
    assert (other(CAPTIONS)[0] - got).abs().max() > 1e-2


def test_pooled_output_is_open_clips_text_feature_before_projection(make_open_clip, tokenizer):
    model, _ = make_open_clip()
    converted = to_clip_text_model(model, "last")
    unprojected = copy.deepcopy(model)
    unprojected.text_projection = None
    ids = token_ids(tokenizer, CAPTIONS)
    with torch.no_grad():
        expected = unprojected.encode_text(ids)
        pooled = converted(ids).pooler_output
        projected = model.encode_text(ids)
    torch.testing.assert_close(pooled, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(pooled @ model.text_projection, projected, atol=1e-5, rtol=1e-5)


def test_save_and_load_keep_weights_ids_and_outputs(make_open_clip, tokenizer, tmp_path):
    model, _ = make_open_clip()
    converted = to_clip_text_model(model, "penultimate")
    save_text_encoder(converted, tokenizer, tmp_path)
    # The layout transformers 4 and SD's converters read too: text_model.* keys, vocab + merges.
    keys = safetensors.torch.load_file(tmp_path / "text_encoder" / "model.safetensors").keys()
    assert keys and all(key.startswith("text_model.") for key in keys)
    assert {"vocab.json", "merges.txt", "tokenizer_config.json"} <= {
        p.name for p in (tmp_path / "tokenizer").iterdir()
    }
    config = json.loads((tmp_path / "tokenizer" / "tokenizer_config.json").read_text())
    assert "local_files_only" not in config and config["model_max_length"] == CONTEXT
    loaded_model, loaded_tokenizer = load_text_encoder_folders(
        tmp_path / "text_encoder", tmp_path / "tokenizer"
    )
    assert isinstance(loaded_model, CLIPTextModel) and loaded_model.config.num_hidden_layers == 2
    for key, value in converted.state_dict().items():
        assert torch.equal(loaded_model.state_dict()[key], value), key
    ids = token_ids(tokenizer, CAPTIONS)
    assert torch.equal(token_ids(loaded_tokenizer, CAPTIONS), ids)
    with torch.no_grad():
        torch.testing.assert_close(loaded_model(ids), converted(ids), atol=0, rtol=0)
    # Without tokenizer.json (SD 1.x's file set): the same ids from vocab.json + merges.txt.
    (tmp_path / "tokenizer" / "tokenizer.json").unlink()
    assert torch.equal(
        token_ids(CLIPTokenizer.from_pretrained(tmp_path / "tokenizer"), CAPTIONS), ids
    )


@pytest.mark.parametrize(
    ("text_cfg", "layer", "message"),
    [
        ({"ls_init_value": 0.1}, "last", "layer scale"),
        ({"no_causal_mask": True}, "last", "no causal mask"),
        ({"qk_norm": True}, "last", "custom attention blocks"),
        ({"layers": 1}, "penultimate", "2 layers or more"),
    ],
)
def test_towers_a_clip_text_model_cannot_hold_are_one_line_errors(
    make_open_clip, text_cfg, layer, message
):
    model, _ = make_open_clip(**text_cfg)
    with pytest.raises(UserError, match=message) as caught:
        to_clip_text_model(model, layer)
    assert "\n" not in str(caught.value)
