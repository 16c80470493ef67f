"""Contrastive image-text losses: open_clip's own ClipLoss and SigLipLoss, chosen by a typed option.

Both gather features across ranks themselves (rank and world size come from the trainer), so the
negatives of every rank count, as in open_clip's training.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from open_clip.loss import ClipLoss, SigLipLoss

from ldm_train.errors import check_choice

ContrastiveLossKind = Literal["clip", "siglip"]
LOSS_KINDS: tuple[str, ...] = get_args(ContrastiveLossKind)


def build_contrastive_loss(
    kind: ContrastiveLossKind,
    rank: int = 0,
    world_size: int = 1,
    local_loss: bool = False,
    gather_with_grad: bool = False,
) -> ClipLoss | SigLipLoss:
    """open_clip's loss for `kind`, set up for this rank of world_size processes.

    clip: softmax cross-entropy over the (gathered) batch; local_loss computes only this rank's rows
    against all gathered features, gather_with_grad backpropagates through the gather (together
    they give the exact full-batch gradient under DDP's gradient averaging).
    siglip: pairwise sigmoid loss; features of other ranks come by neighbour exchange.
    """
    check_choice("stage.module.loss", kind, LOSS_KINDS)
    if kind == "siglip":
        return SigLipLoss(rank=rank, world_size=world_size)
    return ClipLoss(
        local_loss=local_loss,
        gather_with_grad=gather_with_grad,
        cache_labels=True,
        rank=rank,
        world_size=world_size,
    )


def contrastive_terms(
    loss: ClipLoss | SigLipLoss,
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """{"contrastive": loss} from an open_clip model's outputs (logit_scale already exp()-ed)."""
    terms = loss(image_features, text_features, logit_scale, logit_bias, output_dict=True)
    return {"contrastive": terms["contrastive_loss"]}
