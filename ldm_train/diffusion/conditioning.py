"""The U-Net's conditioning: captions -> the cross-attention context, from the frozen text encoder
(and, for a transformer denoiser, the pooled text vector: the end token's hidden state).

One part of the U-Net stage, with what belongs to it: caption dropout (captions replaced by "", the
unconditional input of classifier-free guidance), the cache of hidden states by caption, the
empty caption's context, and hidden states that latent-cache shards bring along. Without a text
encoder the U-Net trains unconditionally on a zero context (text_context).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from ldm_train.diffusion.frozen import Frozen, KeyedCache
from ldm_train.errors import UserError


class TextEncoder(Protocol):
    """What the U-Net stage needs from a text encoder (ldm_train.diffusion.text_encoder.ClipTextEncoder)."""

    width: int

    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]: ...

    def end_positions(self, captions: list[str]) -> torch.Tensor: ...


def text_context(
    text_encoder: TextEncoder | None, captions: list[str], width: int, device: torch.device
) -> torch.Tensor:
    """Cross-attention context B x L x width. Without a text encoder: one zero token, so the same
    UNet2DConditionModel trains unconditionally (its cross-attention then adds a learned constant)."""
    if text_encoder is None:
        return torch.zeros(len(captions), 1, width, device=device)
    hidden_states, _ = text_encoder(list(captions))
    return hidden_states.to(device)


def pooled_text(
    text_encoder: TextEncoder | None, context: torch.Tensor, captions: list[str]
) -> torch.Tensor:
    """B x width: each caption's end-token state in its hidden states `context` (a CLIPTextModel's
    pooler_output), the pooled text vector a transformer denoiser reads. Only the captions are
    tokenized, so it works on cached hidden states too. Without a text encoder: zeros."""
    if text_encoder is None:
        return context.new_zeros(len(context), context.shape[-1])
    positions = text_encoder.end_positions(list(captions)).to(context.device)
    return context[torch.arange(len(context), device=context.device), positions]


class Conditioning:
    """Frozen, so shared rather than copied (deepcopy, e.g. the EMA's copy of the stage, returns
    it): neither its text encoder nor its cache are part of the trained weights."""

    def __init__(
        self,
        text_encoder: TextEncoder | None = None,
        caption_dropout: float = 0.1,
        cache_size: int = 0,
    ):
        """cache_size: captions whose hidden states are kept (LRU); 0 keeps none."""
        if not 0.0 <= caption_dropout <= 1.0:
            raise UserError(
                f"stage.module.conditioning.caption_dropout={caption_dropout}; need 0 <= p <= 1"
            )
        self._text_encoder = Frozen(text_encoder)
        self.caption_dropout = caption_dropout
        self.cache = KeyedCache(cache_size)
        self._empty: torch.Tensor | None = None

    def __deepcopy__(self, memo: dict) -> Conditioning:
        return self

    @property
    def conditional(self) -> bool:
        return self._text_encoder.module is not None

    @property
    def width(self) -> int | None:
        """The text encoder's width (the U-Net's cross_attention_dim); None when unconditional."""
        return self._text_encoder.module.width if self.conditional else None

    @property
    def layer(self) -> str | None:
        return getattr(self._text_encoder.module, "layer", None)

    def text_encoder(self, device: torch.device) -> TextEncoder | None:
        """The frozen text encoder, moved to `device` if needed; None when unconditional."""
        return self._text_encoder.on(device)

    def context(self, captions: Sequence[str], width: int, device: torch.device) -> torch.Tensor:
        """B x L x width hidden states of the captions (kept in the cache, if on)."""
        text_encoder = self.text_encoder(device)
        if text_encoder is None:
            return text_context(None, list(captions), width, device)
        return self.cache.lookup(
            captions,
            lambda indices: text_context(
                text_encoder, [captions[i] for i in indices], width, device
            ),
        )

    def dropped(self, count: int, generator: torch.Generator, device: torch.device) -> list[bool]:
        """Which captions of a batch are dropped to "" (drawn from the step's generator)."""
        if not self.conditional or self.caption_dropout <= 0:
            return [False] * count
        draw = torch.rand(count, generator=generator, device=device)
        return [d < self.caption_dropout for d in draw.tolist()]

    def batch_context(
        self, batch: dict, dropped: list[bool], width: int, device: torch.device
    ) -> torch.Tensor:
        """The context of a training batch: the text encoder on its captions (dropped ones as ""),
        or the hidden states a latent-cache shard holds with the dropped rows set to ""'s."""
        captions = list(batch["caption"])
        if "text" not in batch or not self.conditional:
            return self.context(
                ["" if d else c for c, d in zip(captions, dropped, strict=True)], width, device
            )
        hidden_states = batch["text"].to(device, torch.float32)
        if hidden_states.shape[-1] != width:
            raise UserError(
                f"cached text hidden states are {hidden_states.shape[-1]} wide, the U-Net attends "
                f"to {width}: cache again with the same stage.text_encoder and stage.text_layer"
            )
        if any(dropped):
            mask = torch.tensor(dropped, device=device)[:, None, None]
            hidden_states = torch.where(mask, self.empty_context(width, device), hidden_states)
        return hidden_states

    def pooled(self, context: torch.Tensor, captions: Sequence[str]) -> torch.Tensor:
        """B x width: the pooled text vector of a transformer denoiser (frozen.pooled_text)."""
        return pooled_text(self._text_encoder.module, context, list(captions))

    def empty_context(self, width: int, device: torch.device) -> torch.Tensor:
        """The empty caption's hidden states (L x width): the encoder is frozen, so computed once."""
        if self._empty is None or self._empty.device != device:
            self._empty = self.context([""], width, device)[0].float()
        return self._empty
