"""Generation shared by every rank of a validation: each rank makes its share of the images and
measures it; SampleMetrics sums and gathers the figures across ranks."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from ldm_train.diffusion.sampler import per_prompt

# (prompts, seeds) -> images N x 3 x H x W, image i from the noise of seeds[i] (e.g. a partial of
# ldm_train.diffusion.sampler.sample with the stage's U-Net, scheduler, VAE and text encoder).
SampleFn = Callable[[list[str], list[int]], torch.Tensor]


def rank_share(n_items: int, rank: int, world_size: int) -> tuple[list[int], int]:
    """Which of n items this rank generates: every world_size-th from its rank, padded with
    repeats to the same count on every rank (under FSDP each forward pass is collective: a rank
    with fewer batches would hang the others). Returns the indices and how many of them are this
    rank's own (the rest are padding, to be left out of the metrics)."""
    per_rank = -(-n_items // world_size)
    mine = list(range(rank, n_items, world_size))
    filler = mine[:1] or [0]
    return mine + filler * (per_rank - len(mine)), len(mine)


def generate_share(
    sample_fn: SampleFn,
    prompts: Sequence[str],
    labels: Sequence[Mapping] | None,
    n: int,
    seed: int,
    rank: int,
    world_size: int,
) -> tuple[torch.Tensor, list[str], list[Mapping] | None]:
    """This rank's images of n per prompt (image j of a prompt from seed + j, as on one process),
    with their prompts and labels, the padding already dropped."""
    repeated, seeds = per_prompt(prompts, n, seed)
    indices, own = rank_share(len(repeated), rank, world_size)
    images = sample_fn([repeated[i] for i in indices], [seeds[i] for i in indices])
    kept = indices[:own]
    kept_labels = [labels[i // n] for i in kept] if labels is not None else None
    return images[:own], [repeated[i] for i in kept], kept_labels
