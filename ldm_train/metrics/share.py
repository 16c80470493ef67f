"""Generation shared by every rank of a validation: each rank makes its share of the images and
measures it (SampleMetrics sums and gathers the figures across ranks); assemble puts the gathered
shares back in order, e.g. for the grid."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

# (prompts, seeds) -> images N x 3 x H x W, image i from the noise of seeds[i] (e.g. a partial of
# ldm_train.diffusion.sampler.sample with the stage's U-Net, scheduler, VAE and text encoder).
SampleFn = Callable[[list[str], list[int]], torch.Tensor]


def rank_share(n_items: int, rank: int, world_size: int) -> tuple[list[int], int]:
    """Which of n items this rank generates: a contiguous block, the ranks' blocks in rank order,
    so that what torchmetrics gathers (rank by rank) is in the order of one process (KID's random
    subsets pick by position). Padded with repeats to the same count on every rank: under FSDP
    each forward pass is collective, and a rank with fewer batches would hang the others. Returns
    the indices and how many of them are this rank's own (the rest are padding, to be left out of
    the metrics)."""
    per_rank = -(-n_items // world_size)
    mine = list(range(min(rank * per_rank, n_items), min((rank + 1) * per_rank, n_items)))
    filler = mine[:1] or [0]
    return mine + filler * (per_rank - len(mine)), len(mine)


def sample_share(
    sample_fn: SampleFn, prompts: Sequence[str], seeds: Sequence[int], rank: int, world_size: int
) -> tuple[torch.Tensor, list[int], int]:
    """This rank's images of the items (prompts[i] from the noise of seeds[i]), padded to the same
    count on every rank: (images, which item each is, how many of them are this rank's own)."""
    indices, own = rank_share(len(prompts), rank, world_size)
    images = sample_fn([prompts[i] for i in indices], [seeds[i] for i in indices])
    return images, indices, own


def assemble(gathered: torch.Tensor, n_items: int, block: int | None = None) -> torch.Tensor:
    """Every rank's padded share, stacked as all_gather gives them (world x rows x ...), back into
    the first n_items items in their order, the padding left out. Rank r's rows are the items from
    r * block on (block: rank_share's count per rank; by default that of n_items), so a prefix of
    the items can travel alone: each rank sends its first min(block, n_items) rows."""
    world_size = len(gathered)
    block = block or -(-n_items // world_size)
    rows = [max(0, min(block, n_items - rank * block)) for rank in range(world_size)]
    return torch.cat([gathered[rank, :count] for rank, count in enumerate(rows)])
