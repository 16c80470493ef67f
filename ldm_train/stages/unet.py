"""Stage unet: the latent denoiser (a diffusers UNet2DConditionModel, or an SD3Transformer2DModel:
ldm_train.diffusion.denoiser) learns to predict the noise, the velocity or the flow at random
timesteps in the VAE's latent space, conditioned on the frozen text encoder.

One training step (training_step):
    captions -> some dropped to "" (conditioning.dropped)
    image B x 3 x H x W  --VAE.encode, sample, * scaling_factor-->  x0 B x 4 x H/f x W/f  (latents)
    captions --frozen text encoder-->  context B x L x D                           (conditioning)
    t ~ U{0 .. T-1}, noise ~ N(0, 1)        (all draws from a generator seeded by seed, rank, step)
    x_t = scheduler.add_noise(x0, noise, t)   (flow: (1 - sigma) x0 + sigma noise, t = sigma T)
    loss = MSE(net(x_t, t, context), noise, velocity or noise - x0)      (loss: DiffusionObjective)
The stage receives its parts ready-made: the net (or its preset as a partial, sized here from the
parts), the noise scheduler, the Conditioning, the LatentEncoder, the objective and the optimizer.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence

import lightning as L
import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from torchmetrics import MeanMetric

from ldm_train.adapters.lora import (
    LoraAdapter,
    adapter_names,
    adapter_only,
    check_adapter_state,
    seed_dropout,
    trained_context,
)
from ldm_train.adapters.prior import prior_flags, prior_losses
from ldm_train.callbacks.images import log_image_rows
from ldm_train.diffusion.conditioning import Conditioning
from ldm_train.diffusion.denoiser import (
    DENOISERS,
    Denoiser,
    DenoiserFactory,
    Sizes,
    build_denoiser,
    context_key,
    context_width,
    is_transformer,
    patch_size,
    predict,
    training_flops,
)
from ldm_train.diffusion.ema import EMA
from ldm_train.diffusion.latents import LatentEncoder, encode_images
from ldm_train.diffusion.loss import DiffusionObjective, diffusion_loss, sample_noise
from ldm_train.diffusion.pipeline import Pipeline
from ldm_train.diffusion.schedule import sampler_name
from ldm_train.diffusion.sizes import sample_sized
from ldm_train.distributed import full_weights
from ldm_train.errors import UserError
from ldm_train.metrics.validation import ValidationDraws, ValidationOptions
from ldm_train.perf import Perf
from ldm_train.pretrained import Pretrained, check_unet_fits, unwrap
from ldm_train.stages.base import OptimizerFactory, SchedulerFactory, StageModule, step_generator

log = logging.getLogger(__name__)

VALIDATION_SEED = (
    7_777_777  # the validation loss's noise: the same at every validation of every run
)


class SamplesBeforeEMA(L.Callback):
    """Draws the validation samples as a callback listed before the EMA's: Lightning runs the
    callbacks' on_validation_epoch_end before the module's, and the EMA callback swaps the training
    weights back in there, so the module's own hook would sample with those."""

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: UnetStage) -> None:
        pl_module.validate_samples()


def upstream_width(net: Denoiser | DenoiserFactory, conditioning: Conditioning) -> int:
    """The text hidden states' width: the text encoder's; unconditional, the net's or preset's
    (else 1)."""
    if conditioning.width is not None:
        return conditioning.width
    if isinstance(net, DENOISERS):
        return context_width(net)
    return dict(getattr(net, "keywords", {})).get(context_key(net)) or 1


def make_denoiser(
    net: Denoiser | DenoiserFactory,
    source: str | None,
    conditioning: Conditioning,
    latents: LatentEncoder,
) -> Denoiser:
    """The denoiser (ldm_train.diffusion.denoiser), sized from or checked against the parts;
    source: model.pretrained's, when the net was loaded (its architecture is kept)."""
    width = upstream_width(net, conditioning)
    if source is not None:
        check_unet_fits(net, source, latents.channels, width)
    side = max(max(h, w) for h, w in latents.latent_sides)
    return build_denoiser(net, Sizes(latents.channels, width, latents.side, side))


def check_ema_decay(decay: float | None, adapter: LoraAdapter | None = None) -> float | None:
    if decay is not None and not 0.0 < decay < 1.0:
        raise UserError(f"stage.module.ema_decay={decay}; need 0 < decay < 1 (or null: no EMA)")
    if decay is not None and adapter is not None:  # the EMA would copy (and save) the base weights
        raise UserError("adapter=lora trains without an EMA: set model.ema_decay=null")
    return decay


class UnetStage(StageModule):
    def __init__(
        self,
        net: Denoiser | DenoiserFactory | Pretrained,
        noise_scheduler: SchedulerMixin,
        optimizer: OptimizerFactory,
        lr_scheduler: SchedulerFactory | None = None,
        conditioning: Conditioning | None = None,
        latents: LatentEncoder | None = None,
        loss: DiffusionObjective | None = None,
        ema_decay: float | None = 0.999,
        seed: int = 0,
        validation: ValidationOptions | Mapping | None = None,
        perf: Perf | None = None,
        adapter: LoraAdapter | None = None,
        prior_weight: float = 1.0,
    ):
        """net: a UNet2DConditionModel or SD3Transformer2DModel, its preset (a partial) sized
        from the parts, or a Pretrained one (model.pretrained: kept as it is). adapter: LoRA
        (ldm_train.adapters.lora): only its weights train and are checkpointed. prior_weight: the
        loss weight of class images (sample json "prior": true; ldm_train.adapters.prior)."""
        super().__init__(optimizer, lr_scheduler, perf)
        self.conditioning = conditioning or Conditioning()
        self.latents = latents or LatentEncoder()
        net, self.pretrained_source = unwrap(net)
        net = make_denoiser(net, self.pretrained_source, self.conditioning, self.latents)
        self.adapter, self.prior_weight = adapter, prior_weight
        # The adapted text encoder's model, when it trains: held here so that the optimizer, DDP
        # and checkpoints see its adapter weights (the Conditioning holds the same model).
        self.text_model = (
            adapter.attach(net, self.pretrained_source, self.conditioning) if adapter else None
        )
        self.net = self.perf.apply(net)
        self.noise_scheduler = noise_scheduler
        self.loss = loss or DiffusionObjective()
        self.loss.check(noise_scheduler)
        self.ema_decay, self.seed = check_ema_decay(ema_decay, adapter), seed
        self.validation = ValidationOptions.parse(validation)
        sampler_name(self.validation.sampling.sampler, noise_scheduler.config)  # fits the objective
        self.samples = ValidationDraws(self.validation)
        self.val_loss = MeanMetric()
        self.val_loss_at = torch.nn.ModuleList(MeanMetric() for _ in self.fixed_timesteps())
        # (x0, context) shapes of the latest training batch; FLOPs per batch shape
        self._batch_shapes, self._flops = None, {}

    def trainable_parameters(self):
        if self.adapter is not None:
            return self.adapter.param_groups(self.net, self.text_model)
        return self.net.parameters()

    def configure_callbacks(self):
        ema = [EMA(self.ema_decay)] if self.ema_decay is not None else []
        return [SamplesBeforeEMA(), *ema]

    def setup(self, stage: str) -> None:
        """Every rank reads the validation prompts alike: data.prompts, else val captions."""
        datamodule = getattr(self.trainer, "datamodule", None)
        self.samples.prepare(
            getattr(datamodule, "val_urls", None),
            getattr(datamodule, "loader", None),
            self.conditioning.conditional,
        )

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["validation_samples"] = self.samples.state_dict()
        if self.adapter is not None:  # the base weights come from model.pretrained
            checkpoint["state_dict"] = adapter_only(checkpoint["state_dict"], adapter_names(self))

    def load_state_dict(self, state_dict: Mapping, strict: bool = True, assign: bool = False):
        """With an adapter, a checkpoint holds its weights only: strict means all of them."""
        if self.adapter is None:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        if strict:
            check_adapter_state(state_dict, adapter_names(self), set(self.state_dict()))
        return super().load_state_dict(state_dict, strict=False, assign=assign)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.samples.load_state_dict(checkpoint.get("validation_samples", {}))

    def pipeline(self) -> Pipeline:
        """The stage's parts as a Pipeline: what validation samples with and export writes."""
        return Pipeline(
            unet=self.net,
            scheduler=self.noise_scheduler,
            vae=self.latents.vae(self.device),
            text_encoder=self.conditioning.text_encoder(self.device),
            image_size=self.latents.image_size,
            sampling=self.validation.sampling,
            prompts=self.samples.prompts,
        )

    # -- training ---------------------------------------------------------------------------------
    def context(self, captions: Sequence[str]) -> torch.Tensor:
        width = context_width(self.net)
        return self.conditioning.context(captions, width, self.device).to(self.net.dtype)

    def predictor(self, context: torch.Tensor, captions: Sequence[str]) -> Callable:
        """predict(x_t, t) of the net given the captions' context (the captions as used: dropped
        ones as ""; the transformer also reads their pooled vector)."""
        pooled = self.conditioning.pooled(context, captions) if is_transformer(self.net) else None

        def predict_noise(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            x_t = self.perf.input(x_t.to(self.net.dtype))
            return predict(self.net, x_t, t, context, pooled)

        return predict_noise

    @property
    def flops_per_batch(self) -> int | None:
        """The net's forward + backward FLOPs of the latest training batch, counted once per batch
        shape when asked: Lightning's ThroughputMonitor reads it to log FLOP/s and, on GPUs, the
        model FLOP utilisation."""
        shapes = self._batch_shapes
        if shapes is not None and shapes not in self._flops:
            self._flops[shapes] = training_flops(self.net, *shapes)
        return self._flops.get(shapes)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        generator = step_generator(
            self.device, self.seed, self.global_rank, self.global_step, batch_idx
        )
        seed_dropout(self.adapter, generator)
        dropped = self.conditioning.dropped(len(batch["caption"]), generator, self.device)
        with torch.no_grad():
            x0 = self.latents.batch_latents(batch, generator, self.device)
            if self.text_model is None:
                width = context_width(self.net)
                context = self.conditioning.batch_context(batch, dropped, width, self.device)
        if self.text_model is not None:  # adapter=lora on the text encoder: with its graph
            context = trained_context(self.conditioning, batch, dropped, self.device)
        context = context.to(self.net.dtype)
        self._batch_shapes = (tuple(x0.shape), tuple(context.shape))
        t, noise = self.loss.draw(x0, self.noise_scheduler, generator, patch_size(self.net))
        captions = ["" if d else c for c, d in zip(batch["caption"], dropped, strict=True)]
        prior = prior_flags(batch)
        if prior is None:
            predict_noise = self.predictor(context, captions)
            losses = self.loss(predict_noise, self.noise_scheduler, x0, t, noise)
        else:  # class images in the batch: their loss weighted apart (DreamBooth)

            def rows(mask: torch.Tensor) -> Callable:
                return self.predictor(context[mask], [captions[i] for i in mask.nonzero()[:, 0]])

            parts = (rows, self.noise_scheduler, x0, t, noise)
            losses = prior_losses(self.loss, *parts, prior, self.prior_weight)
        for name, value in losses.items():
            self.log(f"train/{name}", value, prog_bar=True, batch_size=len(x0))
        return sum(losses.values())

    # -- validation: loss at fixed timesteps and noise, then a grid of samples --------------------
    def fixed_timesteps(self) -> list[int]:
        """validation.timesteps evenly spaced timesteps (bin centres of the training range)."""
        steps, count = self.noise_scheduler.config.num_train_timesteps, self.validation.timesteps
        return [int((i + 0.5) * steps / count) for i in range(count)]

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        generator = step_generator(self.device, self.seed, VALIDATION_SEED, batch_idx)
        x0 = encode_images(self.latents.vae(self.device), batch["image"], generator)
        predict_noise = self.predictor(self.context(batch["caption"]), batch["caption"])
        noise = sample_noise(x0.shape, generator, self.device)  # no offset: comparable across runs
        for metric, step in zip(self.val_loss_at, self.fixed_timesteps(), strict=True):
            t = torch.full((len(x0),), step, device=self.device, dtype=torch.long)
            # Unweighted (plain MSE to the target), at fixed t: comparable across runs.
            loss = diffusion_loss(predict_noise, self.noise_scheduler, x0, t, noise)["mse"]
            metric.update(loss)
            self.val_loss.update(loss)
        self.log("val/mse", self.val_loss, prog_bar=True, batch_size=len(x0))
        for metric, step in zip(self.val_loss_at, self.fixed_timesteps(), strict=True):
            self.log(f"val/mse_t{step:04d}", metric, batch_size=len(x0))

    def validate_samples(self) -> None:
        """Every k-th validation, on every rank (SamplesBeforeEMA calls it, the EMA weights in):
        the samples of the prompts, shared by the ranks, as a captioned grid and measured."""
        trainer = self.trainer
        if trainer.sanity_checking or not self.samples.due():
            return
        started = time.monotonic()
        world = trainer.world_size
        with full_weights(trainer.strategy.model):  # FSDP: the U-Net is called outside it
            images, figures = self.samples.draw(
                self.draw_images,
                self.global_rank,
                world,
                lambda tensor: self.all_gather(tensor).reshape(world, *tensor.shape),
                self.device,
            )
        for name, value in figures.items():  # already reduced over ranks by torchmetrics
            self.log(f"val/{name}", value, sync_dist=True)
        prompts = self.samples.prompts
        rows = list(images.view(len(prompts), -1, *images.shape[1:]))
        log_image_rows(trainer, "samples", rows, prompts, value_range=(0, 255))
        if trainer.is_global_zero:
            seconds = time.monotonic() - started
            log.info("validation samples: %d images in %.1f s", self.samples.drawn, seconds)

    def draw_images(self, prompts: list[str], seeds: list[int]) -> torch.Tensor:
        """Images for prompts[i] from the noise of seeds[i], with the weights the module holds."""
        pipe = self.pipeline()
        sizes = [self.validation.sizes.get(prompt) for prompt in prompts]
        # One canvas on every rank (the images are gathered): the largest of all the sizes.
        every = [*self.validation.sizes.values(), (pipe.image_size, pipe.image_size)]
        canvas = (max(width for width, _ in every), max(height for _, height in every))
        return sample_sized(pipe, prompts, seeds, sizes, canvas)

    # -- export: one folder a user can copy elsewhere and generate from ---------------------------
    def export(self, out_dir):
        """The pipeline folder (ldm_train.diffusion.pipeline), with the weights this module holds:
        the EMA's after training. With an adapter: the adapter's folder (formats/lora_file.py)."""
        if self.adapter is not None:
            return self.adapter.save(out_dir, self.net, self.text_model, self.pretrained_source)
        return self.pipeline().save(out_dir)
