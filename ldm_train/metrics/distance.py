"""Fréchet distance and KID between two sets of image features, with torchmetrics' own metrics
(their state syncs across DDP ranks; the reference side is kept across resets).

Both are fed features, not images: the extractor runs once per image for both metrics (torchmetrics
would run its `feature` module once per metric), and it stays out of the metrics' module tree, so
out of checkpoints.
"""

from __future__ import annotations

import warnings

import torch
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance
from torchmetrics.utilities.data import dim_zero_cat

from ldm_train.errors import UserError

FEATURE_STATES = ("real_features", "fake_features")  # KernelInceptionDistance's list states
KID_SEED = 0  # KID's random subsets: the same draw every time, so figures compare run to run


class Precomputed(torch.nn.Module):
    """The `feature` module of the metrics below: features in, the same features out."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def check_sizes(name: str, n_reference: int, n_generated: int) -> None:
    if n_reference < 2 or n_generated < 2:
        raise UserError(
            f"{name} needs at least 2 reference and 2 generated images, got {n_reference} and "
            f"{n_generated}: generate more images (more prompts or images per prompt)"
        )


class FeatureFD(FrechetInceptionDistance):
    """torchmetrics' Fréchet distance on precomputed features: update(features, real)."""

    def __init__(self, num_features: int, **kwargs):
        super().__init__(feature=Precomputed(num_features), reset_real_features=False, **kwargs)
        self.orig_dtype = torch.float32  # set by update otherwise: a rank may have none

    def compute(self) -> torch.Tensor:
        check_sizes(
            "the Fréchet distance",
            int(self.real_features_num_samples),
            int(self.fake_features_num_samples),
        )
        return super().compute()


class FeatureKID(KernelInceptionDistance):
    """torchmetrics' KID on precomputed features: update(features, real). Its subset size shrinks
    to the smaller set when that has fewer than `subset_size` images (torchmetrics raises), and the
    subsets are drawn from a fixed seed without touching the global random state. When a subset
    holds both whole sets, all subsets are alike: one is computed (std 0)."""

    def __init__(self, num_features: int, subsets: int = 100, subset_size: int = 1000, **kwargs):
        # torchmetrics warns that KID keeps every feature: known, and the caller bounds the images.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*will save all extracted features")
            super().__init__(
                feature=Precomputed(num_features),
                subsets=subsets,
                subset_size=subset_size,
                reset_real_features=False,
                **kwargs,
            )
        self.max_subset_size = subset_size
        self.num_features = num_features
        # torchmetrics gathers a list state without a reduction one tensor per update: ranks that
        # updated a different number of times would hang. With "cat" each rank's list is joined
        # first, so one gather; a rank without images must still send an N x D tensor (torchmetrics'
        # own stand-in is 1-d, which aborts the gather): each list starts with a 0 x D tensor.
        for state in FEATURE_STATES:
            self._reductions[state] = dim_zero_cat
        self._add_placeholders()

    def _add_placeholders(self) -> None:
        for state in FEATURE_STATES:
            if not getattr(self, state):
                getattr(self, state).append(torch.zeros(0, self.num_features, device=self.device))

    def reset(self) -> None:
        super().reset()  # keeps the reference features
        self._add_placeholders()

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        n_real = len(dim_zero_cat(self.real_features))
        n_fake = len(dim_zero_cat(self.fake_features))
        check_sizes("KID", n_real, n_fake)
        self.subset_size = min(self.max_subset_size, n_real, n_fake)
        subsets = self.subsets
        if self.subset_size == n_real == n_fake:  # every subset is both whole sets: one will do
            self.subsets = 1  # (a VAE's 512 reconstructions: 100 x the same 512 x 512 kernels)
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(KID_SEED)
                return super().compute()
        finally:
            self.subsets = subsets
