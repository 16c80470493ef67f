"""The frozen text encoder of the U-Net stage: captions -> (hidden states, pooled embedding).

    encoder = load_text_encoder("outputs/shapes/clip/export", layer="penultimate")
    hidden_states, pooled = encoder(["a small red circle in the center on a blue background", ""])
    # hidden_states: B x context_length x encoder.width (cross-attention input of the U-Net)
    # pooled:        B x encoder.embed_dim (the model's own text embedding)

Two kinds, one surface: ClipTextEncoder (an open_clip text tower: a stage=clip export, an open_clip
hub folder, or an open_clip model card + weights file, as SD 2 uses OpenCLIP ViT-H/14) and
TransformersTextEncoder (a transformers CLIPTextModel + CLIPTokenizer, as SD 1.x uses OpenAI's
CLIP ViT-L/14). Tokens of the last or the penultimate transformer layer, each through the final
layer norm (SD 2's FrozenOpenCLIPEmbedder; diffusers' clip_skip=1); "" is a valid caption (start +
end tokens), the unconditional input of classifier-free guidance. Each can leave as a transformers
CLIPTextModel + CLIPTokenizer (`to_transformers`), the text_encoder/ + tokenizer/ of a pipeline.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal, get_args

import open_clip
import torch
from transformers import CLIPTextModel, CLIPTokenizer

from ldm_train.errors import UserError, check_choice, reading
from ldm_train.formats.clip_model import is_clip_folder, load_clip, load_named_clip
from ldm_train.formats.transformers_clip import (
    clip_tokenizer,
    keep_layers,
    load_text_encoder_folders,
    text_encoder_folders,
    to_clip_text_model,
    transformer,
)

log = logging.getLogger(__name__)

TextLayer = Literal["last", "penultimate"]
TEXT_LAYERS: tuple[str, ...] = get_args(TextLayer)
ACCEPTED = (
    "a stage=clip export or an open_clip hub folder (open_clip_config.json; make one with "
    "`python -m ldm_train stage=clip`), an open_clip model card and weights file "
    "(NAME:FILE, e.g. ViT-H-14:/weights/open_clip_model.safetensors), a transformers "
    "CLIPTextModel folder (config.json, its tokenizer in it or in a sibling tokenizer/), a Stable "
    "Diffusion pipeline folder (text_encoder/ + tokenizer/), or null to train unconditionally"
)


class FrozenTextEncoder(torch.nn.Module):
    """What both kinds share: frozen, in eval mode even when the module holding it trains."""

    layer: TextLayer

    def __init__(self, model: torch.nn.Module, tokenizer: object, layer: TextLayer, layers: int):
        super().__init__()
        check_choice("layer", layer, TEXT_LAYERS)
        if layer == "penultimate" and layers < 2:
            raise UserError("layer='penultimate' needs a text transformer of 2 layers or more")
        self.model = model
        self.tokenizer = tokenizer
        self.layer = layer
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> FrozenTextEncoder:
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device


class ClipTextEncoder(FrozenTextEncoder):
    """An open_clip text tower. Captions -> (B x L x width, pooled B x embed_dim: projected)."""

    def __init__(
        self,
        model: open_clip.CLIP,
        tokenizer: open_clip.tokenizer.SimpleTokenizer,
        layer: TextLayer = "last",
        source_dir: Path | None = None,
    ):
        """source_dir: the open_clip folder it was read from, which an export copies when a
        CLIPTextModel cannot hold the tower (None: built in memory)."""
        model.visual = None  # the image tower is not needed: free its memory
        super().__init__(model, tokenizer, layer, model.transformer.layers)
        self.source_dir = None if source_dir is None else Path(source_dir)

    @classmethod
    def from_pretrained(
        cls, export_dir: str | Path, layer: TextLayer = "last", device: str | torch.device = "cpu"
    ) -> ClipTextEncoder:
        """Load a stage=clip export folder or an open_clip hub folder (ldm_train.formats.clip_model)."""
        clip = load_clip(export_dir, device)
        return cls(clip.model, clip.tokenizer, layer, source_dir=Path(export_dir))

    @property
    def width(self) -> int:
        """D of the hidden states: the U-Net's cross-attention width."""
        return self.model.transformer.width

    @property
    def embed_dim(self) -> int:
        """E of the pooled embedding (CLIP's joint image-text space)."""
        return self.model.text_projection.shape[-1]

    @property
    def context_length(self) -> int:
        return self.model.context_length

    @torch.no_grad()
    def forward(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.tokenizer(list(captions)).to(self.device)
        outputs = self.model.forward_intermediates(
            text=tokens,
            text_indices=2 if self.layer == "penultimate" else 1,
            normalize=False,
            normalize_intermediates=True,  # ln_final on the layer taken, as SD2 does
        )
        hidden_states = outputs["text_intermediates"][0]
        return hidden_states, outputs["text_features"]

    def end_positions(self, captions: list[str]) -> torch.Tensor:
        """The position of each caption's (first) end token: where a CLIPTextModel pools."""
        tokens = self.tokenizer(list(captions))
        return (tokens == self.tokenizer.eot_token_id).int().argmax(dim=-1)

    def to_transformers(self) -> tuple[CLIPTextModel, CLIPTokenizer]:
        """Converted: a CLIPTextModel whose last_hidden_state is this encoder's hidden states."""
        model = to_clip_text_model(self.model, self.layer)
        return model, clip_tokenizer(self.context_length)


class TransformersTextEncoder(FrozenTextEncoder):
    """A transformers CLIPTextModel + CLIPTokenizer (SD 1.x's text_encoder/ + tokenizer/).
    Captions -> (B x L x width, pooled B x width: the end token's state, as CLIPTextModel pools)."""

    def __init__(self, model: CLIPTextModel, tokenizer: CLIPTokenizer, layer: TextLayer = "last"):
        super().__init__(model, tokenizer, layer, model.config.num_hidden_layers)

    @classmethod
    def from_pretrained(
        cls, folder: str | Path, layer: TextLayer = "last", device: str | torch.device = "cpu"
    ) -> TransformersTextEncoder:
        """Load a CLIPTextModel folder (with its tokenizer) or a pipeline folder, from disk only."""
        folders = text_encoder_folders(folder)
        if folders is None:
            raise UserError(f"no transformers CLIPTextModel in {folder}: expected {ACCEPTED}")
        model, tokenizer = load_text_encoder_folders(*folders)
        return cls(model.to(device), tokenizer, layer)

    @property
    def width(self) -> int:
        return self.model.config.hidden_size

    @property
    def embed_dim(self) -> int:
        return self.model.config.hidden_size

    @property
    def context_length(self) -> int:
        # A tokenizer saved without a model_max_length reports a huge one: the model bounds it.
        return min(self.tokenizer.model_max_length, self.model.config.max_position_embeddings)

    @torch.no_grad()
    def forward(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode(captions)

    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """forward with autograd as the caller has it (adapter=lora trains this model's adapter)."""
        # As diffusers' StableDiffusionPipeline.encode_prompt: pad to the context, mask only if
        # the model's config asks for it, clip_skip=1 is hidden_states[-2] through the final norm.
        tokens = self.tokenizer(
            list(captions),
            padding="max_length",
            max_length=self.context_length,
            truncation=True,
            return_tensors="pt",
        ).to(self.device)
        masked = getattr(self.model.config, "use_attention_mask", False)
        mask = tokens.attention_mask if masked else None
        penultimate = self.layer == "penultimate"
        outputs = self.model(
            tokens.input_ids, attention_mask=mask, output_hidden_states=penultimate
        )
        hidden_states = outputs.last_hidden_state
        if penultimate:
            hidden_states = transformer(self.model).final_layer_norm(outputs.hidden_states[-2])
        return hidden_states, outputs.pooler_output

    def end_positions(self, captions: list[str]) -> torch.Tensor:
        """Where CLIPTextModel pools each caption: its first end token (configs from before
        transformers fixed eos_token_id, which say 2, pool at the largest id: the end token)."""
        ids = self.tokenizer(
            list(captions), padding="max_length", max_length=self.context_length, truncation=True
        ).input_ids
        ids = torch.tensor(ids)
        eos = self.model.config.eos_token_id
        return ids.argmax(dim=-1) if eos == 2 else (ids == eos).int().argmax(dim=-1)

    def to_transformers(self) -> tuple[CLIPTextModel, CLIPTokenizer]:
        """As loaded; for the penultimate layer without the last one, so that its last_hidden_state
        is what this encoder gives (a pipeline has no clip_skip in its folder)."""
        if self.layer == "last":
            return self.model, self.tokenizer
        return keep_layers(self.model, self.model.config.num_hidden_layers - 1), self.tokenizer


def load_text_encoder(
    path: str | Path | None, layer: TextLayer = "last"
) -> ClipTextEncoder | TransformersTextEncoder | None:
    """stage.text_encoder -> a frozen text encoder; None for an unconditional U-Net."""
    if path is None:
        return None
    with reading(f"stage.text_encoder={path}"):
        encoder = text_encoder_at(path, layer)
    log.info(
        "text encoder from %s (%s, layer %s, width %d)",
        path,
        type(encoder).__name__,
        layer,
        encoder.width,
    )
    return encoder


def text_encoder_at(
    path: str | Path, layer: TextLayer
) -> ClipTextEncoder | TransformersTextEncoder:
    """The text encoder at path, of whichever kind it is (ACCEPTED)."""
    folder = Path(path)
    if is_clip_folder(folder):
        encoder = ClipTextEncoder.from_pretrained(folder, layer=layer)
    elif text_encoder_folders(folder) is not None:
        encoder = TransformersTextEncoder.from_pretrained(folder, layer=layer)
    elif (named := parse_named(str(path))) is not None:
        clip = load_named_clip(*named)
        encoder = ClipTextEncoder(clip.model, clip.tokenizer, layer)
    else:
        found = "a folder of none of these kinds" if folder.exists() else "nothing there"
        raise UserError(
            f"stage.text_encoder: no CLIP export at {path} nor another text encoder ({found}); "
            f"it takes {ACCEPTED}"
        )
    return encoder


def parse_named(spec: str) -> tuple[str, Path] | None:
    """NAME:FILE (an open_clip model card name and a weights file) -> (name, file); else None."""
    name, colon, weights = spec.partition(":")
    if not colon or not name or "/" in name or "\\" in name or Path(spec).exists():
        return None
    return name, Path(weights)
