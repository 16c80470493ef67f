"""Caption text drawn per sample: tag shuffling (data.shuffle_tags)."""

from __future__ import annotations

import random


def shuffle_tags(caption: str, keep: int | None, rng: random.Random) -> str:
    """kohya's shuffle_caption with keep_tokens=keep: the comma-separated tags after the first
    `keep` in a new order at every draw (the model sees no order it could learn); None: as is."""
    if keep is None:
        return caption
    tags = [tag.strip() for tag in caption.split(",")]
    kept, rest = tags[:keep], tags[keep:]
    rng.shuffle(rest)
    return ", ".join(tag for tag in kept + rest if tag)
