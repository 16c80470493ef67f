"""DreamBooth's prior preservation (Ruiz et al. 2023): while a model learns a new subject from a
few images, images of the subject's class that the base model drew itself train alongside, so
that the class keeps looking as it did. Class images are ordinary samples whose json says
{"prior": true} (python -m ldm_train.adapters.class_images writes them); listed with the instance
shards in data.train_urls they are mixed into the batches in proportion to their number, and their
loss is weighted by stage.module.prior_weight.

    loss = (sum of instance losses + prior_weight * sum of class losses) / batch size

reported as two terms, train/mse (the instance images' part) and train/prior_mse (the class
images'). With prior_weight 1 the total is the plain mean over the batch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

PRIOR_KEY = "prior"  # the sample json's flag


def prior_flags(batch: dict) -> list[bool] | None:
    """Which samples of the batch are class images; None when none is."""
    flags = [bool((meta or {}).get(PRIOR_KEY)) for meta in batch.get("meta") or []]
    return flags if any(flags) else None


def prior_losses(
    objective: Callable,
    predictor: Callable[[torch.Tensor], Callable],
    scheduler,
    x0: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    prior: list[bool],
    weight: float,
) -> dict[str, torch.Tensor]:
    """The objective's terms on the instance rows and, prefixed prior_, on the class rows, each
    weighted by its share of the batch (and the class rows by `weight`). predictor(rows): the net's
    predict(x_t, t) for the batch's rows of that boolean mask (their context). The draws (t, noise)
    are the whole batch's, so a row trains exactly as in one pass over the batch."""
    rows = torch.tensor(prior, device=x0.device)
    terms: dict[str, torch.Tensor] = {}
    for name, mask, factor in (("", ~rows, 1.0), ("prior_", rows, weight)):
        if not mask.any():
            continue
        share = factor * mask.sum() / len(mask)
        part = objective(predictor(mask), scheduler, x0[mask], t[mask], noise[mask])
        terms.update({f"{name}{key}": share * value for key, value in part.items()})
    return terms
