"""The U-Net's conditioning part on its own: caption dropout from the step's generator, the
hidden-states cache, the empty caption's context, cached hidden states from latent-cache shards,
and unconditional training."""

from __future__ import annotations

import copy

import pytest
import torch

from ldm_train.diffusion.conditioning import Conditioning
from ldm_train.diffusion.text_encoder import load_text_encoder
from ldm_train.errors import UserError

CPU = torch.device("cpu")
CAPTIONS = ["a large red circle", "a small blue square", "a large red circle", "a cross"]


@pytest.fixture(scope="module")
def encoder(upstream):
    return load_text_encoder(upstream["clip"])


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_context_is_the_text_encoders_hidden_states_and_the_cache_keeps_them(encoder):
    plain, cached = Conditioning(encoder), Conditioning(encoder, cache_size=2)
    expected = encoder(CAPTIONS)[0]
    assert torch.equal(plain.context(CAPTIONS, 32, CPU), expected)
    assert torch.allclose(cached.context(CAPTIONS, 32, CPU), expected, atol=1e-6)
    assert len(cached.cache.items) == 2  # LRU: the two captions used last
    assert plain.width == 32 and plain.layer == "last" and plain.conditional


def test_dropout_draws_from_the_generator(encoder):
    conditioning = Conditioning(encoder, caption_dropout=0.5)
    first = conditioning.dropped(64, generator(1), CPU)
    assert first == conditioning.dropped(64, generator(1), CPU)  # same step, same drops
    assert first != conditioning.dropped(64, generator(2), CPU)
    assert 16 < sum(first) < 48
    assert Conditioning(encoder, caption_dropout=0.0).dropped(8, generator(), CPU) == [False] * 8
    assert Conditioning(None, caption_dropout=0.5).dropped(8, generator(), CPU) == [False] * 8


def test_dropped_captions_get_the_empty_captions_context_from_text_or_cache(encoder):
    conditioning = Conditioning(encoder)
    dropped = [False, True, False, True]
    batch = {"caption": CAPTIONS}
    context = conditioning.batch_context(batch, dropped, 32, CPU)
    assert torch.equal(
        context, encoder(["" if d else c for c, d in zip(CAPTIONS, dropped, strict=True)])[0]
    )
    # A latent-cache shard brings the hidden states: dropped rows become ""'s, the rest stay.
    cached = {"caption": CAPTIONS, "text": encoder(CAPTIONS)[0]}
    from_cache = conditioning.batch_context(cached, dropped, 32, CPU)
    assert torch.allclose(from_cache, context, atol=1e-6)
    with pytest.raises(
        UserError, match="cached text hidden states are 32 wide, the U-Net attends to 64"
    ):
        conditioning.batch_context(cached, dropped, 64, CPU)


def test_unconditional_context_is_one_zero_token():
    conditioning = Conditioning(None)
    context = conditioning.context(CAPTIONS, 16, CPU)
    assert context.shape == (4, 1, 16) and not context.any()
    assert conditioning.width is None and not conditioning.conditional


def test_a_copy_shares_the_frozen_encoder_and_cache(encoder):
    conditioning = Conditioning(encoder, cache_size=8)
    assert copy.deepcopy(conditioning) is conditioning  # the EMA's copy of the stage shares it
    assert not any(p.requires_grad for p in encoder.parameters()) and not encoder.training


def test_bad_dropout_is_a_one_line_error():
    with pytest.raises(UserError, match="caption_dropout=1.5; need 0 <= p <= 1"):
        Conditioning(None, caption_dropout=1.5)
