"""Stage vae: a KL autoencoder (diffusers' AutoencoderKL) trained on reconstruction."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL
from torchmetrics import MeanMetric
from torchmetrics.image import PeakSignalNoiseRatio

from ldm_train.stages.base import OptimizerFactory, SchedulerFactory, StageModule


class VaeStage(StageModule):
    def __init__(
        self,
        net: AutoencoderKL,
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None = None,
        kl_weight: float = 1e-6,
    ):
        super().__init__(optimizer, scheduler)
        self.net = net
        self.kl_weight = kl_weight
        self.val_l1 = MeanMetric()
        self.val_psnr = PeakSignalNoiseRatio(data_range=1.0)

    def losses(self, images: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        posterior = self.net.encode(images).latent_dist
        reconstruction = self.net.decode(posterior.sample()).sample
        terms = {
            "l1": (reconstruction - images).abs().mean(),
            "kl": self.kl_weight * posterior.kl().mean(),
        }
        return terms, reconstruction

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        terms, _ = self.losses(batch["image"])
        size = batch["image"].shape[0]
        for name, value in terms.items():
            self.log(f"train/{name}", value, batch_size=size)
        loss = sum(terms.values())
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        images = batch["image"]
        reconstruction = self.net(images, sample_posterior=False).sample
        self.val_l1.update((reconstruction - images).abs().mean())
        self.val_psnr.update((reconstruction.clamp(-1, 1) + 1) / 2, (images + 1) / 2)
        self.log("val/l1", self.val_l1, prog_bar=True)
        self.log("val/psnr", self.val_psnr, prog_bar=True)
