"""Stage unet: noise prediction with random timesteps (diffusers U-Net and noise scheduler)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel
from torchmetrics import MeanMetric

from ldm_train.stages.base import OptimizerFactory, SchedulerFactory, StageModule


class UnetStage(StageModule):
    def __init__(
        self,
        net: UNet2DModel,
        noise_scheduler: DDPMScheduler,
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None = None,
    ):
        super().__init__(optimizer, scheduler)
        self.net = net
        self.noise_scheduler = noise_scheduler
        self.val_loss = MeanMetric()

    def diffusion_loss(self, x0: torch.Tensor) -> torch.Tensor:
        noise = torch.randn_like(x0)
        t = torch.randint(
            0, self.noise_scheduler.config.num_train_timesteps, (x0.shape[0],), device=x0.device
        )
        x_t = self.noise_scheduler.add_noise(x0, noise, t)
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(x0, noise, t)
        else:
            target = noise
        return F.mse_loss(self.net(x_t, t).sample, target)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.diffusion_loss(batch["image"])
        self.log("train/mse", loss, prog_bar=True, batch_size=batch["image"].shape[0])
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.val_loss.update(self.diffusion_loss(batch["image"]))
        self.log("val/mse", self.val_loss, prog_bar=True)
