"""The frozen text encoder of the U-Net stage: the text tower of a CLIP exported by stage=clip.

    encoder = ClipTextEncoder.from_pretrained("outputs/shapes/clip/export", layer="penultimate")
    hidden_states, pooled = encoder(["a small red circle in the center on a blue background", ""])
    # hidden_states: B x context_length x encoder.width (cross-attention input of the U-Net)
    # pooled:        B x encoder.embed_dim (the projected end-of-text token, as CLIP embeds text)

As Stable Diffusion 2's FrozenOpenCLIPEmbedder: tokens of the last or the penultimate transformer
layer, each through ln_final; "" is a valid caption (start + end tokens), the unconditional input
of classifier-free guidance.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal, get_args

import open_clip
import torch

from ldm_train.config import UserError, check_choice
from ldm_train.exports.clip import CONFIG_FILE, is_clip_folder, load_clip

log = logging.getLogger(__name__)

TextLayer = Literal["last", "penultimate"]
TEXT_LAYERS: tuple[str, ...] = get_args(TextLayer)


class ClipTextEncoder(torch.nn.Module):
    """Captions -> (per-token hidden states B x L x width, pooled embedding B x embed_dim); frozen."""

    def __init__(
        self,
        model: open_clip.CLIP,
        tokenizer: open_clip.tokenizer.SimpleTokenizer,
        layer: TextLayer = "last",
    ):
        super().__init__()
        check_choice("layer", layer, TEXT_LAYERS)
        if layer == "penultimate" and model.transformer.layers < 2:
            raise UserError("layer='penultimate' needs a text transformer of 2 layers or more")
        model.visual = None  # the image tower is not needed: free its memory
        self.model = model
        self.tokenizer = tokenizer
        self.layer = layer
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_pretrained(
        cls, export_dir: str | Path, layer: TextLayer = "last", device: str | torch.device = "cpu"
    ) -> ClipTextEncoder:
        """Load a stage=clip export folder (ldm_train.exports.clip)."""
        clip = load_clip(export_dir, device)
        return cls(clip.model, clip.tokenizer, layer)

    def train(self, mode: bool = True) -> ClipTextEncoder:
        # Frozen: stays in eval mode even when the module holding it switches to training.
        return super().train(False)

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

    @property
    def device(self) -> torch.device:
        return self.model.token_embedding.weight.device

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


def load_text_encoder(path: str | Path | None, layer: TextLayer = "last") -> ClipTextEncoder | None:
    """The text tower of a stage=clip export, frozen; None for an unconditional U-Net."""
    if path is None:
        return None
    path = Path(path)
    if not is_clip_folder(path):
        raise UserError(
            f"stage.text_encoder: no CLIP export at {path} (no {CONFIG_FILE} there); make it with "
            "`python -m ldm_train stage=clip` (same data/experiment options), or set "
            "stage.text_encoder to a CLIP export folder, or stage.text_encoder=null to train "
            "unconditionally"
        )
    encoder = ClipTextEncoder.from_pretrained(path, layer=layer)
    encoder.source_dir = path  # the export copies this folder next to the U-Net
    log.info("text encoder from %s (layer %s, width %d)", path, layer, encoder.width)
    return encoder
