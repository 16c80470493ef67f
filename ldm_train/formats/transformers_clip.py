"""Stable Diffusion's text encoder format: a transformers CLIPTextModel folder and a CLIPTokenizer
folder (a pipeline's text_encoder/ and tokenizer/). This module converts an open_clip text tower
into it, writes it, and finds and reads such folders (SD 1.x's, SD 2's, our own exports).

    text_model = to_clip_text_model(clip, layer="penultimate")  # last_hidden_state: that layer
    tokenizer = clip_tokenizer(clip.context_length)             # ids equal open_clip's
    save_text_encoder(text_model, tokenizer, pipeline_dir)      # text_encoder/ + tokenizer/

As diffusers' convert_open_clip_checkpoint for SD 2: the fused attention input projection is split
into q/k/v, and a tower used at its penultimate layer leaves without its last layer, so that
CLIPTextModel's last_hidden_state (final_layer_norm of its last layer) is that layer after ln_final.

The tokenizer is open_clip's BPE vocabulary under the standard CLIP names, padding with "!" (id 0)
as open_clip pads. Plain text gets open_clip's ids; open_clip also cleans captions with ftfy and
html.unescape (curly quotes, "&amp;", mojibake), which transformers' CLIP tokenizer does not, and
it reads a literal "<end_of_text>" in a caption as its end token.
"""

from __future__ import annotations

import copy
import json
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import open_clip
import torch
from open_clip.transformer import QuickGELU, ResidualAttentionBlock
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
from transformers.utils import logging as hf_logging

from ldm_train.errors import UserError, check_choice
from ldm_train.safety import check_safetensors

TEXT_ENCODER_DIR = "text_encoder"
TOKENIZER_DIR = "tokenizer"
# open_clip's special tokens, renamed as in OpenAI's CLIP vocab.json (the ids stay 49406 / 49407).
SPECIAL_NAMES = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
PAD_TOKEN = "!"  # open_clip pads with id 0, the byte "!" (as SD 2's tokenizer does)
TEXT_MODEL_TYPE = "clip_text_model"  # config.json's model_type of a CLIPTextModel folder
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "vocab.json")


def to_clip_text_model(
    model: open_clip.CLIP, layer: Literal["last", "penultimate"] = "last"
) -> CLIPTextModel:
    """open_clip's text tower as a CLIPTextModel whose last_hidden_state is `layer` after ln_final
    and whose pooler_output (for layer="last") is open_clip's text feature before projection."""
    check_choice("layer", layer, ("last", "penultimate"))
    blocks = list(model.transformer.resblocks)
    check_convertible(model, blocks)
    keep = len(blocks) - (layer == "penultimate")
    if keep < 1:
        raise UserError("layer='penultimate' needs a text transformer of 2 layers or more")
    text_model = CLIPTextModel(text_config(model, blocks[0], keep)).eval()
    transformer(text_model).load_state_dict(converted_weights(model, blocks[:keep]))
    return text_model


def transformer(text_model: CLIPTextModel) -> torch.nn.Module:
    """The module holding embeddings / encoder / final_layer_norm: CLIPTextModel.text_model in
    transformers 4, the model itself in transformers 5."""
    return getattr(text_model, "text_model", text_model)


def check_convertible(model: open_clip.CLIP, blocks: list[torch.nn.Module]) -> None:
    """CLIPTextModel is a plain pre-norm causal transformer: refuse open_clip options it lacks."""
    eot = clip_special_ids()[1]
    problem = None
    if model.attn_mask is None:
        problem = "no causal mask (text_cfg.no_causal_mask)"
    elif model.text_pool_type not in ("argmax", "eos") or (
        model.text_pool_type == "eos" and model.text_eos_id != eot
    ):
        problem = f"pooling {model.text_pool_type!r} (CLIPTextModel pools the end token)"
    elif any(type(block) is not ResidualAttentionBlock for block in blocks):
        problem = "custom attention blocks (text_cfg.block_type, qk_norm, scale_* options)"
    elif any(not isinstance(b.ls_1, torch.nn.Identity) for b in blocks):
        problem = "layer scale (text_cfg.ls_init_value)"
    elif blocks[0].attn.in_proj_bias is None:
        problem = "attention without biases"
    else:
        activation(blocks[0])  # raises for an activation CLIPTextModel lacks
    if problem:
        raise UserError(f"this open_clip text tower has {problem}; a CLIPTextModel cannot hold it")


def activation(block: ResidualAttentionBlock) -> str:
    """The transformers hidden_act of an open_clip block's MLP."""
    act = block.mlp.gelu
    if isinstance(act, QuickGELU):
        return "quick_gelu"
    if isinstance(act, torch.nn.GELU) and act.approximate == "none":
        return "gelu"
    raise UserError(f"the open_clip text MLP uses {act}; a CLIPTextModel takes GELU or QuickGELU")


def text_config(
    model: open_clip.CLIP, block: ResidualAttentionBlock, layers: int
) -> CLIPTextConfig:
    sot, eot = clip_special_ids()
    projection = model.text_projection
    embed_dim = getattr(projection, "out_features", None) or (
        projection.shape[-1] if projection is not None else model.transformer.width
    )
    return CLIPTextConfig(
        vocab_size=model.vocab_size,
        hidden_size=model.transformer.width,
        intermediate_size=block.mlp.c_fc.out_features,
        projection_dim=embed_dim,
        num_hidden_layers=layers,
        num_attention_heads=block.attn.num_heads,
        max_position_embeddings=model.context_length,
        hidden_act=activation(block),
        layer_norm_eps=model.ln_final.eps,
        pad_token_id=0,
        bos_token_id=sot,
        eos_token_id=eot,  # not 2: transformers then pools the first end token, as "argmax" does
    )


def converted_weights(
    model: open_clip.CLIP, blocks: list[ResidualAttentionBlock]
) -> dict[str, torch.Tensor]:
    """The CLIPTextModel state dict (transformers' key names) of open_clip's text tower."""
    weights = {
        "embeddings.token_embedding.weight": model.token_embedding.weight,
        "embeddings.position_embedding.weight": model.positional_embedding,
        "final_layer_norm.weight": model.ln_final.weight,
        "final_layer_norm.bias": model.ln_final.bias,
    }
    for i, block in enumerate(blocks):
        prefix = f"encoder.layers.{i}."
        attn = block.attn
        for name, weight, bias in zip(
            ("q_proj", "k_proj", "v_proj"),
            attn.in_proj_weight.chunk(3),
            attn.in_proj_bias.chunk(3),
            strict=True,
        ):
            weights[f"{prefix}self_attn.{name}.weight"] = weight
            weights[f"{prefix}self_attn.{name}.bias"] = bias
        for ours, theirs in (
            ("self_attn.out_proj", attn.out_proj),
            ("layer_norm1", block.ln_1),
            ("layer_norm2", block.ln_2),
            ("mlp.fc1", block.mlp.c_fc),
            ("mlp.fc2", block.mlp.c_proj),
        ):
            weights[f"{prefix}{ours}.weight"] = theirs.weight
            weights[f"{prefix}{ours}.bias"] = theirs.bias
    return {k: v.detach().clone() for k, v in weights.items()}


def clip_special_ids() -> tuple[int, int]:
    tokenizer = open_clip.tokenizer.SimpleTokenizer()
    return tokenizer.sot_token_id, tokenizer.eot_token_id


def clip_tokenizer(context_length: int) -> CLIPTokenizer:
    """A CLIPTokenizer with open_clip's vocabulary, padding and context length."""
    simple = open_clip.tokenizer.SimpleTokenizer(context_length=context_length)
    vocab = {SPECIAL_NAMES.get(token, token): i for token, i in simple.encoder.items()}
    merges = [" ".join(pair) for pair in sorted(simple.bpe_ranks, key=simple.bpe_ranks.get)]
    with tempfile.TemporaryDirectory() as folder:
        # The files SD 1.x's tokenizer/ holds: every transformers version reads them.
        (Path(folder) / "vocab.json").write_text(json.dumps(vocab))
        (Path(folder) / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
        tokenizer = CLIPTokenizer.from_pretrained(
            folder,
            pad_token=PAD_TOKEN,
            model_max_length=context_length,
            # "!" is the pad token: without this a "!" in a caption would become a special token.
            split_special_tokens=True,
        )
    for key in ("is_local", "local_files_only"):  # where it was read from: not worth saving
        tokenizer.init_kwargs.pop(key, None)
    return tokenizer


def keep_layers(text_model: CLIPTextModel, layers: int) -> CLIPTextModel:
    """A copy holding only the first `layers` transformer layers (the final layer norm kept)."""
    text_model = copy.deepcopy(text_model)
    encoder = transformer(text_model).encoder
    encoder.layers = encoder.layers[:layers]
    text_model.config.num_hidden_layers = layers
    return text_model


@contextmanager
def quiet_progress() -> Iterator[None]:
    """transformers 5 draws a progress bar whenever it loads or saves a model: noise on a CLI's
    stderr."""
    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def save_text_encoder(text_model: CLIPTextModel, tokenizer: CLIPTokenizer, folder: Path) -> None:
    """Write a pipeline's text_encoder/ and tokenizer/ into folder, in the layout every
    transformers version and SD's checkpoint converters read: weights named text_model.* (as
    transformers 4 writes them; 5 drops the prefix and reads both), vocab.json + merges.txt
    besides tokenizer.json (transformers 4's slow CLIPTokenizer reads only those)."""
    weights = transformer(text_model).state_dict()
    with quiet_progress():
        text_model.save_pretrained(
            Path(folder) / TEXT_ENCODER_DIR,
            state_dict={f"text_model.{k}": v for k, v in weights.items()},
        )
    tokenizer_dir = Path(folder) / TOKENIZER_DIR
    tokenizer.save_pretrained(tokenizer_dir)
    if not (tokenizer_dir / "vocab.json").is_file():
        tokenizer.backend_tokenizer.model.save(str(tokenizer_dir))


def is_text_model_folder(path: Path) -> bool:
    config = Path(path) / "config.json"
    return config.is_file() and json.loads(config.read_text()).get("model_type") == TEXT_MODEL_TYPE


def text_encoder_folders(path: str | Path) -> tuple[Path, Path] | None:
    """(CLIPTextModel folder, tokenizer folder) of a pipeline folder or a CLIPTextModel folder
    (tokenizer inside it, in its tokenizer/ or in a sibling tokenizer/); None if path is neither."""
    path = Path(path)
    if is_text_model_folder(path / TEXT_ENCODER_DIR):
        model_dir, candidates = path / TEXT_ENCODER_DIR, [path / TOKENIZER_DIR]
    elif is_text_model_folder(path):
        model_dir, candidates = path, [path, path / TOKENIZER_DIR, path.parent / TOKENIZER_DIR]
    else:
        return None
    for folder in candidates:
        if any((folder / name).is_file() for name in TOKENIZER_FILES):
            return model_dir, folder
    raise UserError(
        f"no tokenizer for the text encoder in {model_dir}: expected "
        f"{' or '.join(TOKENIZER_FILES)} in {' or '.join(map(str, candidates))}"
    )


def load_text_encoder_folders(
    model_dir: Path, tokenizer_dir: Path
) -> tuple[CLIPTextModel, CLIPTokenizer]:
    """Read both, from disk only; float32 as our own encoders (fp16 folders are upcast)."""
    check_safetensors(model_dir, "the text encoder")
    with quiet_progress():
        text_model = CLIPTextModel.from_pretrained(
            model_dir, local_files_only=True, use_safetensors=True
        )
    text_model = text_model.float().eval()
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    return text_model, tokenizer
