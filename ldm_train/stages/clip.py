"""Stage clip: contrastive image-text pretraining of an open_clip model."""

from __future__ import annotations

import math
from collections.abc import Callable

import open_clip
import torch
from open_clip.loss import ClipLoss
from torchmetrics import MeanMetric

from ldm_train.stages.base import OptimizerFactory, SchedulerFactory, StageModule

Tokenizer = Callable[[list[str]], torch.Tensor]


class ClipStage(StageModule):
    def __init__(
        self,
        net: open_clip.CLIP,
        tokenizer: Tokenizer,
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None = None,
        image_mean: tuple[float, float, float] = open_clip.OPENAI_DATASET_MEAN,
        image_std: tuple[float, float, float] = open_clip.OPENAI_DATASET_STD,
    ):
        super().__init__(optimizer, scheduler)
        self.net = net
        self.tokenizer = tokenizer
        # The loader gives [-1, 1]; CLIP towers expect (x - mean) / std on [0, 1].
        self.register_buffer(
            "image_mean", torch.tensor(image_mean).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer(
            "image_std", torch.tensor(image_std).view(1, 3, 1, 1), persistent=False
        )
        self.loss = ClipLoss()
        self.val_loss = MeanMetric()

    def setup(self, stage: str) -> None:
        # Negatives from every rank: the loss gathers features across the process group.
        self.loss = ClipLoss(rank=self.global_rank, world_size=self.trainer.world_size)

    def embed(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        images = ((batch["image"] + 1) / 2 - self.image_mean) / self.image_std
        tokens = self.tokenizer(batch["caption"]).to(self.device)
        return self.net(images, tokens)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        image_features, text_features, logit_scale = self.embed(batch)
        loss = self.loss(image_features, text_features, logit_scale)
        size = len(batch["caption"])
        self.log("train/contrastive", loss, prog_bar=True, batch_size=size)
        self.log("train/logit_scale", logit_scale, batch_size=size)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        # As CLIP does: the temperature may not exceed 100.
        with torch.no_grad():
            self.net.logit_scale.clamp_(0, math.log(100))

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        image_features, text_features, logit_scale = self.embed(batch)
        self.val_loss.update(ClipLoss()(image_features, text_features, logit_scale))
        self.log("val/contrastive", self.val_loss, prog_bar=True)
