"""Stage vae: a KL autoencoder (diffusers' AutoencoderKL) trained with latent-diffusion's recipe.

Training logs each loss term as train/<name> and their sum as train/loss; with the discriminator on,
its hinge loss is train/disc (its own optimizer, not part of train/loss). Validation logs
val/rec, val/psnr and val/ssim (images in [0, 1]), the reconstruction Fréchet distance and KID
(val/rfd_clip, val/rkid_clip; val/rfid_inception ...: ldm_train.metrics.validation), an image grid
of inputs above reconstructions,
and measures the latent scale: 1 / std of the posterior samples over the validation pass
(latent-diffusion's scale_by_std, over every validation batch instead of one training batch). The
scale is a buffer, so checkpoints carry it, and export() writes it into the diffusers config as
scaling_factor: train() exports after fit, with the scale of the final validation;
`python -m ldm_train.export` takes the checkpoint's, which is the latest validation's before that
checkpoint was written (ModelCheckpoint saves a step's checkpoint before that step's validation
unless it is told save_on_train_epoch_end=false).

Optimization: without a discriminator Lightning optimizes automatically (so gradient clipping and
accumulation work). With one, two optimizers step in manual optimization: the autoencoder's every
training step, the discriminator's from disc_start on. Lightning counts every optimizer step as a
global step in manual optimization (Lightning issue #17958), which would make trainer.max_steps and
the checkpoint/log intervals count half steps; the discriminator's step is left uncounted, so
trainer.global_step and trainer.max_steps count training steps in both modes.
"""

from __future__ import annotations

import itertools
import logging
import math
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from lightning.pytorch.core.optimizer import LightningOptimizer
from torchmetrics import MeanMetric
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from ldm_train.callbacks.images import image_grid, log_image
from ldm_train.distributed import full_weights
from ldm_train.errors import UserError
from ldm_train.formats.vae_folder import save_vae
from ldm_train.losses.autoencoder import AutoencoderLoss
from ldm_train.metrics.validation import MetricOptions, ReconstructionMetrics
from ldm_train.perf import Perf
from ldm_train.pretrained import Pretrained, unwrap
from ldm_train.stages.base import OptimizerFactory, SchedulerFactory, StageModule, step_generator

log = logging.getLogger(__name__)


class VaeStage(StageModule):
    LATENT_SEED = 0  # posterior samples for the latent scale: the same noise at every validation
    SCALE_BATCHES = 8  # batches the scale is measured on after a run no validation measured

    def __init__(
        self,
        net: AutoencoderKL | Pretrained,
        loss: AutoencoderLoss,
        optimizer: OptimizerFactory,
        lr_scheduler: SchedulerFactory | None = None,
        disc_optimizer: OptimizerFactory | None = None,
        disc_scheduler: SchedulerFactory | None = None,
        grid_images: int = 8,
        posterior_logvar_init: float | None = None,
        perf: Perf | None = None,
        seed: int = 0,
        metrics: MetricOptions | Mapping | None = None,
    ):
        """metrics: the reconstruction distances' CLIP and features (None: no rFD)."""
        super().__init__(optimizer, lr_scheduler, perf)
        if loss.discriminator is not None and disc_optimizer is None:
            raise UserError(
                "the discriminator is on (stage.module.loss.disc_weight > 0) but "
                "stage.module.disc_optimizer is null"
            )
        net, source = unwrap(net)
        if posterior_logvar_init is not None and source is None:  # an init, not a change
            init_posterior_logvar(net, posterior_logvar_init)
        self.net = self.perf.apply(net)
        self.seed = seed  # posterior samples: from (seed, rank, step), so resumes are exact
        self.loss = loss
        self.disc_optimizer_factory = disc_optimizer
        self.disc_scheduler_factory = disc_scheduler
        self.grid_images = grid_images
        self.automatic_optimization = loss.discriminator is None
        self.val_rec = MeanMetric()
        self.val_psnr = PeakSignalNoiseRatio(data_range=1.0)
        self.val_ssim = StructuralSimilarityIndexMeasure(data_range=1.0)
        # E[z] and E[z^2] of the latents over a validation pass (synced across ranks).
        self.latent_mean = MeanMetric().set_dtype(torch.float64)
        self.latent_square = MeanMetric().set_dtype(torch.float64)
        # 1 / std of the latents at the latest validation; 0 until one has run.
        self.register_buffer("latent_scale", torch.zeros(()))
        self._grid_rows: list[torch.Tensor] = []
        self._latent_generator: torch.Generator | None = None
        self.reconstruction_metrics = ReconstructionMetrics(metrics)

    # -- optimizers --------------------------------------------------------------------------

    def configure_optimizers(self):
        configs = [self._optimizer_config(self.net.parameters(), "autoencoder")]
        if self.loss.discriminator is not None:
            configs.append(
                self._optimizer_config(self.loss.discriminator.parameters(), "discriminator")
            )
        return configs

    def _optimizer_config(self, parameters, name: str) -> dict:
        autoencoder = name == "autoencoder"
        make_optimizer = self.optimizer_factory if autoencoder else self.disc_optimizer_factory
        make_scheduler = self.scheduler_factory if autoencoder else self.disc_scheduler_factory
        optimizer = make_optimizer(parameters)
        if make_scheduler is None:
            return {"optimizer": optimizer}
        scheduler = {
            "scheduler": make_scheduler(optimizer),
            "interval": "step",
            "name": f"lr-{name}",
        }
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

    # -- training ----------------------------------------------------------------------------

    def on_fit_start(self) -> None:
        if not self.automatic_optimization:
            # ModelCheckpoint warns at every save in manual optimization that the checkpoint holds
            # the weights after the optimizer step: here that is right (global_step counts
            # completed steps), so the warning is noise.
            warnings.filterwarnings(
                "ignore",
                message="Using ModelCheckpoint with manual optimization",
                category=UserWarning,
            )

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor | None:
        images = self.perf.input(batch["image"])
        step = self.global_step
        generator = step_generator(self.device, self.seed, self.global_rank, step, batch_idx)
        if self.automatic_optimization:
            posterior = self.net.encode(images).latent_dist
            reconstruction = self.net.decode(posterior.sample(generator)).sample
            terms, extras = self.loss.generator_terms(images, reconstruction, posterior, step)
            return self._log_terms(terms, extras, images.shape[0])

        autoencoder_opt, disc_opt = self.optimizers()
        autoencoder_sched, disc_sched = map(self._scheduler_of, (autoencoder_opt, disc_opt))

        with self.toggled_optimizer(autoencoder_opt):  # no gradients into the discriminator
            posterior = self.net.encode(images).latent_dist
            reconstruction = self.net.decode(posterior.sample(generator)).sample
            terms, extras = self.loss.generator_terms(
                images, reconstruction, posterior, step, self.net.decoder.conv_out.weight
            )
            loss = self._log_terms(terms, extras, images.shape[0])
            autoencoder_opt.zero_grad()
            self.manual_backward(loss)
            autoencoder_opt.step()
        if autoencoder_sched is not None:
            autoencoder_sched.step()

        if self.loss.discriminator_active(step):
            with self.toggled_optimizer(disc_opt):
                disc_terms, disc_extras = self.loss.discriminator_terms(images, reconstruction)
                self._log(disc_terms | disc_extras, images.shape[0])
                disc_opt.zero_grad()
                self.manual_backward(disc_terms["disc"])
                step_uncounted(disc_opt)
            if disc_sched is not None:
                disc_sched.step()  # counts discriminator steps: its warmup starts at disc_start
        return None

    def _scheduler_of(self, optimizer: LightningOptimizer):
        """The LR scheduler of this optimizer, or None (either may have none)."""
        for config in self.trainer.lr_scheduler_configs:
            if config.scheduler.optimizer is optimizer.optimizer:
                return config.scheduler
        return None

    def _log_terms(self, terms: dict, extras: dict, batch_size: int) -> torch.Tensor:
        loss = sum(terms.values())
        self._log(terms | extras, batch_size)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        return loss

    def _log(self, values: dict, batch_size: int) -> None:
        self.log_dict({f"train/{k}": v.detach() for k, v in values.items()}, batch_size=batch_size)

    # -- validation --------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        self.reconstruction_metrics.prepare()

    def on_validation_epoch_start(self) -> None:
        self._latent_generator = torch.Generator(self.device).manual_seed(self.LATENT_SEED)
        self._grid_rows = []

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        images = self.perf.input(batch["image"])
        size = images.shape[0]
        posterior = self.net.encode(images).latent_dist
        reconstruction = self.net.decode(posterior.mode()).sample
        self.val_rec.update(self.loss.reconstruction_term(reconstruction, images), weight=size)
        inputs_01, outputs_01 = (images + 1) / 2, (reconstruction.clamp(-1, 1) + 1) / 2
        self.val_psnr.update(outputs_01, inputs_01)
        self.val_ssim.update(outputs_01, inputs_01)
        self._add_latents(posterior)
        self.log("val/rec", self.val_rec, batch_size=size)
        self.log("val/psnr", self.val_psnr, prog_bar=True, batch_size=size)
        self.log("val/ssim", self.val_ssim, batch_size=size)
        if not self.trainer.sanity_checking:  # the reference: the first validation's images
            self.reconstruction_metrics.update(images, reconstruction)
        if batch_idx == 0:
            self._grid_rows = [images[: self.grid_images], reconstruction[: self.grid_images]]

    def on_validation_epoch_end(self) -> None:
        std = self._take_latent_scale()
        if std is not None:
            # Already reduced over ranks (torchmetrics); sync_dist only keeps Lightning quiet.
            self.log("val/latent_std", std.float(), sync_dist=True)
            self.log("val/latent_scale", self.latent_scale.clone(), sync_dist=True)
        if not self.trainer.sanity_checking:  # every rank: the metrics gather across ranks
            for name, value in self.reconstruction_metrics.compute(self.device).items():
                self.log(f"val/{name}", value, sync_dist=True)
        if self._grid_rows:
            log_image(self.trainer, "vae", image_grid(self._grid_rows))
            self._grid_rows = []

    # -- the latent scale: 1 / std of the posterior samples ----------------------------------

    def _add_latents(self, posterior) -> None:
        latents = posterior.sample(generator=self._latent_generator).double()
        self.latent_mean.update(latents)
        self.latent_square.update(latents.square())

    def _take_latent_scale(self) -> torch.Tensor | None:
        """The std of the latents added since the last call (every rank: a collective), kept as
        latent_scale = 1 / std; None if none were added."""
        std = None
        if self.latent_mean.update_count > 0:
            mean, square = self.latent_mean.compute(), self.latent_square.compute()
            std = (square - mean.square()).clamp_min(0).sqrt()
            if std > 0:
                self.latent_scale.fill_(float(1 / std))
        self.latent_mean.reset()
        self.latent_square.reset()
        return std

    def on_fit_end(self) -> None:
        """A run that never validated (shorter than val_every_n_steps with the final validation
        off, or no validation at all) measures the latent scale now, on SCALE_BATCHES batches of
        the validation shards (or the training shards), so its export never carries an unmeasured
        scaling_factor. Every rank: the measurement is reduced over them."""
        if float(self.latent_scale) > 0 or self.trainer.datamodule is None:
            return
        batches = itertools.islice(self.trainer.datamodule.plain_batches(), self.SCALE_BATCHES)
        self._latent_generator = torch.Generator(self.device).manual_seed(self.LATENT_SEED)
        with torch.no_grad(), full_weights(self.trainer.strategy.model):
            for batch in batches:
                self._add_latents(
                    self.net.encode(self.perf.input(batch["image"].to(self.device))).latent_dist
                )
        std = self._take_latent_scale()
        if std is not None:
            log.info("latent scale measured after training (no validation did): std %.5f", std)

    # -- export ------------------------------------------------------------------------------

    def export(self, out_dir: Path) -> Path:
        """A diffusers AutoencoderKL folder (config.json + safetensors) with the measured
        scaling_factor, for AutoencoderKL.from_pretrained(out_dir)."""
        scale = float(self.latent_scale)
        if not (math.isfinite(scale) and scale > 0):
            log.warning(
                "no latent scale measured (no validation ran, e.g. an export of a checkpoint "
                "saved before the first validation): exporting scaling_factor=1.0; set the "
                "right one with stage.vae's config.json or export a later checkpoint"
            )
            scale = 1.0
        return save_vae(self.net, out_dir, scale)


def init_posterior_logvar(net: AutoencoderKL, logvar: float) -> None:
    """Start the encoder's posterior at this log-variance, via the bias of the layer that outputs it.

    diffusers starts it near 0 (std 1), so at first the decoder sees latents drowned in noise, and
    Adam lowers it only by about lr per step: a short run spends much of itself getting there.
    With kl_weight 1e-6 the KL hardly pulls it back up.
    """
    layer = net.quant_conv if net.quant_conv is not None else net.encoder.conv_out
    with torch.no_grad():  # moments = [mean, logvar] along the channels
        layer.bias[net.config.latent_channels :] = logvar


def step_uncounted(optimizer: LightningOptimizer) -> None:
    """optimizer.step() through Lightning (precision plugin, strategy) without adding a global
    step: see the module docstring (Lightning issue #17958)."""
    counted = optimizer._on_before_step, optimizer._on_after_step
    optimizer._on_before_step = optimizer._on_after_step = lambda: None
    try:
        optimizer.step()
    finally:
        optimizer._on_before_step, optimizer._on_after_step = counted
