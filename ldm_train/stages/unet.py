"""Stage unet: noise prediction at random timesteps in the VAE's latent space, conditioned on the
frozen text encoder (diffusers UNet2DConditionModel and noise schedulers).

One training step (training_step -> diffusion_loss):
    image B x 3 x H x W  --VAE.encode, sample, * scaling_factor-->  x0 B x 4 x H/f x W/f
    t ~ U{0 .. T-1}, noise ~ N(0, 1)        (both from a generator seeded by seed and global step)
    x_t = scheduler.add_noise(x0, noise, t)
    loss = MSE(UNet(x_t, t, text_encoder(caption)), noise or velocity)   (captions dropped to "" at
                                                                           caption_dropout)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from omegaconf import DictConfig, ListConfig, OmegaConf
from torchmetrics import MeanMetric

from ldm_train.callbacks.images import image_grid, log_image
from ldm_train.config import UserError
from ldm_train.diffusion.ema import EMA
from ldm_train.diffusion.loss import diffusion_loss, sample_noise
from ldm_train.diffusion.sampler import SamplingOptions, per_prompt, sample
from ldm_train.diffusion.upstream import (
    Frozen,
    KeyedCache,
    TextEncoder,
    encode_images,
    latent_distribution,
    moments_to_distribution,
    sample_latents,
    text_context,
    vae_scale_factor,
)
from ldm_train.perf import Attention, apply_switches, to_channels_last, unet_training_flops
from ldm_train.stages.base import OptimizerFactory, SchedulerFactory, StageModule

log = logging.getLogger(__name__)

PIPELINE_FILE = "ldm_train_pipeline.json"  # the export's index: components and sampling defaults
UnetFactory = Callable[..., UNet2DConditionModel]


def step_generator(device: torch.device, *key: int) -> torch.Generator:
    """A generator seeded from a key such as (seed, rank, global_step, batch_idx): every random draw
    of a step is reproducible, and different keys give unrelated streams (numpy's SeedSequence)."""
    seed = int(np.random.SeedSequence([abs(int(k)) for k in key]).generate_state(1, np.uint64)[0])
    return torch.Generator(device=device).manual_seed(seed & ((1 << 63) - 1))


def prompt_captions(prompts: Sequence[Any] | None) -> list[str]:
    """Prompts from config: strings, or dicts with a "caption" (and label keys for evaluation)."""
    if prompts is None:
        return []
    if isinstance(prompts, DictConfig | ListConfig):
        prompts = OmegaConf.to_container(prompts, resolve=True)
    captions = []
    for prompt in prompts:
        caption = prompt.get("caption") if isinstance(prompt, Mapping) else prompt
        if not isinstance(caption, str):
            raise UserError(f"a prompt must be a string or have a 'caption' string, got {prompt!r}")
        captions.append(caption)
    return captions


def build_net(
    net: UNet2DConditionModel | UnetFactory, in_channels: int, context_width: int, sample_size: int
) -> UNet2DConditionModel:
    """The U-Net, its sizes filled from the upstream parts (keys left null in the preset) or checked
    against them (keys set there, or a ready-made net): one-line errors for a mismatch."""
    if not isinstance(net, UNet2DConditionModel):
        given = dict(getattr(net, "keywords", {}))
        fill = {
            "in_channels": in_channels,
            "out_channels": in_channels,
            "cross_attention_dim": context_width,
            "sample_size": sample_size,
        }
        net = net(**{k: v for k, v in fill.items() if given.get(k) is None})
    where = "the VAE's latent channels" if in_channels != 3 else "the image channels"
    if net.config.in_channels != in_channels:
        raise UserError(
            f"model.net.in_channels={net.config.in_channels} does not match {where} "
            f"({in_channels}); set model.net.in_channels={in_channels} (or null: follow the VAE)"
        )
    if net.config.out_channels != in_channels:
        raise UserError(
            f"model.net.out_channels={net.config.out_channels} must equal the input channels "
            f"({in_channels}): the U-Net predicts noise of the input's shape"
        )
    if net.config.cross_attention_dim != context_width:
        raise UserError(
            f"model.net.cross_attention_dim={net.config.cross_attention_dim} does not match the "
            f"text encoder's width ({context_width}); set it to null to follow the text encoder"
        )
    return net


class UnetStage(StageModule):
    def __init__(
        self,
        net: UNet2DConditionModel | UnetFactory,
        noise_scheduler: SchedulerMixin,
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None = None,
        vae: AutoencoderKL | None = None,
        text_encoder: TextEncoder | None = None,
        image_size: int = 32,
        image_channels: int = 3,
        caption_dropout: float = 0.1,
        snr_gamma: float | None = None,
        offset_noise: float = 0.0,
        ema_decay: float | None = 0.999,
        seed: int = 0,
        val_timesteps: int = 5,
        prompts: Sequence[Any] | None = None,
        sampling: SamplingOptions | Mapping | None = None,
        samples_per_prompt: int = 4,
        text_layer: str | None = None,
        cache_text: int = 0,
        cache_latents: int = 0,
        channels_last: bool = False,
        compile: bool = False,
        compile_backend: str = "inductor",
        gradient_checkpointing: bool = False,
        attention: Attention = "sdpa",
    ):
        """net: a UNet2DConditionModel, or a factory (the preset as a partial) that gets in_channels,
        cross_attention_dim and sample_size from the VAE and the text encoder where left null.
        vae / text_encoder: frozen upstream parts; None trains in pixel space / unconditionally.
        cache_text / cache_latents: keep this many captions' hidden states / training images'
        latent Gaussians (by sample key) instead of recomputing them; latents only when the image
        transforms are deterministic (no random flip or crop). Batches from latent-cache shards
        (python -m ldm_train.cache_latents) bring their own latent moments and hidden states.
        channels_last / compile / gradient_checkpointing / attention: speed switches on the U-Net
        (ldm_train.perf)."""
        super().__init__(optimizer, scheduler)
        if not 0.0 <= caption_dropout <= 1.0:
            raise UserError(f"stage.module.caption_dropout={caption_dropout}; need 0 <= p <= 1")
        if snr_gamma is not None and snr_gamma <= 0:
            raise UserError(f"stage.module.snr_gamma={snr_gamma}; need > 0 (or null: no weighting)")
        if offset_noise < 0:
            raise UserError(f"stage.module.offset_noise={offset_noise}; need >= 0")
        if ema_decay is not None and not 0.0 < ema_decay < 1.0:
            raise UserError(f"stage.module.ema_decay={ema_decay}; need 0 < decay < 1 (or null)")
        factor = vae_scale_factor(vae)
        if image_size % factor:
            raise UserError(
                f"data.image_size={image_size} is not a multiple of the VAE's downsampling ({factor})"
            )
        latent_channels = vae.config.latent_channels if vae is not None else image_channels
        context_width = text_encoder.width if text_encoder is not None else 1
        if text_encoder is None and not isinstance(net, UNet2DConditionModel):
            context_width = dict(getattr(net, "keywords", {})).get("cross_attention_dim") or 1
        self.net = build_net(net, latent_channels, context_width, image_size // factor)
        apply_switches(
            self.net,
            channels_last=channels_last,
            compile=compile,
            compile_backend=compile_backend,
            gradient_checkpointing=gradient_checkpointing,
            attention=attention,
        )
        self.channels_last = channels_last
        self._empty_context: torch.Tensor | None = None
        self._batch_shapes: tuple | None = None  # (x0, context) of the latest training batch
        self._flops: dict[tuple, int] = {}
        self.noise_scheduler = noise_scheduler
        self._vae, self._text_encoder = Frozen(vae), Frozen(text_encoder)
        self.latent_shape = (latent_channels, image_size // factor, image_size // factor)
        self.image_size = image_size
        self.caption_dropout = caption_dropout
        self.snr_gamma = snr_gamma
        self.offset_noise = offset_noise
        self.ema_decay = ema_decay
        self.seed = seed
        self.val_timesteps = val_timesteps
        self.prompts = prompt_captions(prompts)
        if isinstance(sampling, Mapping | DictConfig):
            sampling = SamplingOptions(**sampling)
        self.sampling = sampling or SamplingOptions()
        self.samples_per_prompt = samples_per_prompt
        self.text_layer = text_layer or getattr(text_encoder, "layer", None)
        self.text_cache, self.latent_cache = KeyedCache(cache_text), KeyedCache(cache_latents)
        self.val_loss = MeanMetric()
        self.val_loss_at = torch.nn.ModuleList(MeanMetric() for _ in range(val_timesteps))

    # -- the frozen upstream parts, on the stage's device -----------------------------------------
    @property
    def vae(self) -> AutoencoderKL | None:
        return self._vae.on(self.device)

    @property
    def text_encoder(self) -> TextEncoder | None:
        return self._text_encoder.on(self.device)

    def trainable_parameters(self):
        return self.net.parameters()

    def configure_callbacks(self):
        return [EMA(self.ema_decay)] if self.ema_decay is not None else []

    # -- training ---------------------------------------------------------------------------------
    def context(self, captions: Sequence[str]) -> torch.Tensor:
        """Cross-attention context for the captions (kept in the text cache, if on)."""
        text_encoder, width = self.text_encoder, self.net.config.cross_attention_dim
        if text_encoder is None:
            return text_context(None, list(captions), width, self.device).to(self.net.dtype)
        hidden_states = self.text_cache.lookup(
            captions,
            lambda indices: text_context(
                text_encoder, [captions[i] for i in indices], width, self.device
            ),
        )
        return hidden_states.to(self.net.dtype)

    def encode(
        self, images: torch.Tensor, keys: Sequence[str] | None, generator: torch.Generator
    ) -> torch.Tensor:
        """x0 for a training batch: sampled, scaled latents (the Gaussians kept by sample key in
        the latent cache, if on), or the images themselves in pixel space."""
        vae = self.vae
        if vae is None:
            return images
        if keys is None:
            return encode_images(vae, images, generator)
        distribution = self.latent_cache.lookup(
            keys, lambda indices: latent_distribution(vae, images[indices])
        )
        return sample_latents(vae, distribution, generator)

    def predictor(self, context: torch.Tensor) -> Callable:
        def predict(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            x_t = to_channels_last(x_t.to(self.net.dtype), self.channels_last)
            return self.net(x_t, t, encoder_hidden_states=context).sample

        return predict

    @property
    def flops_per_batch(self) -> int | None:
        """U-Net forward + backward FLOPs of the latest training batch, counted once per batch
        shape when asked: Lightning's ThroughputMonitor reads it to log FLOP/s and, on GPUs, the
        model FLOP utilisation."""
        shapes = self._batch_shapes
        if shapes is not None and shapes not in self._flops:
            self._flops[shapes] = unet_training_flops(dict(self.net.config), *shapes)
        return self._flops.get(shapes)

    def batch_latents(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        """x0 of a training batch: from the images, or sampled from cached latent moments (the
        same draw from the generator, so the same x0 as encoding the images here)."""
        if "latent" not in batch:
            return self.encode(batch["image"], batch.get("key"), generator)
        vae = self.vae
        if vae is None:
            raise UserError(
                "the training shards hold cached latents but stage.vae=null (pixel space): point "
                "data.train_urls at image shards, or set stage.vae to the VAE of the cache"
            )
        moments = batch["latent"].to(self.device, torch.float32)
        channels, height, width = self.latent_shape
        if tuple(moments.shape[1:]) != (2 * channels, height, width):
            raise UserError(
                f"cached latent moments are {tuple(moments.shape[1:])}, this VAE and "
                f"data.image_size give {(2 * channels, height, width)}: cache again with the same "
                "stage.vae and data.image_size (python -m ldm_train.cache_latents)"
            )
        return sample_latents(vae, moments_to_distribution(moments), generator)

    def batch_context(self, batch: dict, captions: list[str], dropped: list[bool]) -> torch.Tensor:
        """Cross-attention context of a training batch: the text encoder on the captions (dropped
        ones as ""), or the cached hidden states with the dropped rows replaced by ""'s."""
        if "text" not in batch or self._text_encoder.module is None:
            return self.context(["" if d else c for c, d in zip(captions, dropped, strict=True)])
        hidden_states = batch["text"].to(self.device, torch.float32)
        width = self.net.config.cross_attention_dim
        if hidden_states.shape[-1] != width:
            raise UserError(
                f"cached text hidden states are {hidden_states.shape[-1]} wide, the U-Net attends "
                f"to {width}: cache again with the same stage.text_encoder and stage.text_layer"
            )
        if any(dropped):
            if self._empty_context is None or self._empty_context.device != self.device:
                self._empty_context = self.context([""])[0].float()  # frozen encoder: computed once
            mask = torch.tensor(dropped, device=self.device)[:, None, None]
            hidden_states = torch.where(mask, self._empty_context, hidden_states)
        return hidden_states.to(self.net.dtype)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        generator = step_generator(
            self.device, self.seed, self.global_rank, self.global_step, batch_idx
        )
        captions = list(batch["caption"])
        dropped = [False] * len(captions)
        if self._text_encoder.module is not None and self.caption_dropout > 0:
            drop = torch.rand(len(captions), generator=generator, device=self.device)
            dropped = [d < self.caption_dropout for d in drop.tolist()]
        with torch.no_grad():
            x0 = self.batch_latents(batch, generator)
            context = self.batch_context(batch, captions, dropped)
        self._batch_shapes = (tuple(x0.shape), tuple(context.shape))
        steps = self.noise_scheduler.config.num_train_timesteps
        t = torch.randint(0, steps, (len(x0),), generator=generator, device=self.device)
        noise = sample_noise(x0.shape, generator, self.device, self.offset_noise)
        losses = diffusion_loss(
            self.predictor(context),
            self.noise_scheduler,
            x0,
            t,
            noise,
            self.snr_gamma,
        )
        for name, value in losses.items():
            self.log(f"train/{name}", value, prog_bar=True, batch_size=len(x0))
        return sum(losses.values())

    # -- validation: loss at fixed timesteps and noise, then a grid of samples --------------------
    def fixed_timesteps(self) -> list[int]:
        """val_timesteps evenly spaced timesteps (bin centres of the training range)."""
        steps = self.noise_scheduler.config.num_train_timesteps
        return [int((i + 0.5) * steps / self.val_timesteps) for i in range(self.val_timesteps)]

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        generator = step_generator(self.device, self.seed, 7_777_777, batch_idx)  # same every run
        x0 = encode_images(self.vae, batch["image"], generator)
        predict = self.predictor(self.context(batch["caption"]))
        noise = sample_noise(x0.shape, generator, self.device)  # no offset: comparable across runs
        for metric, step in zip(self.val_loss_at, self.fixed_timesteps(), strict=True):
            t = torch.full((len(x0),), step, device=self.device, dtype=torch.long)
            loss = diffusion_loss(predict, self.noise_scheduler, x0, t, noise, None)["mse"]
            metric.update(loss)
            self.val_loss.update(loss)
        self.log("val/mse", self.val_loss, prog_bar=True, batch_size=len(x0))
        for metric, step in zip(self.val_loss_at, self.fixed_timesteps(), strict=True):
            self.log(f"val/mse_t{step:04d}", metric, batch_size=len(x0))

    def on_validation_epoch_end(self) -> None:
        trainer = self.trainer
        wanted = bool(self.prompts) and self.samples_per_prompt > 0
        if wanted and trainer.is_global_zero and not trainer.sanity_checking:  # rank 0 samples
            log_image(trainer, "samples", self.sample_grid())

    def sample_grid(self) -> torch.Tensor:
        """One row per prompt, samples_per_prompt columns; the EMA weights during validation."""
        images = self.generate(self.prompts, self.samples_per_prompt, self.sampling)
        rows = images.view(len(self.prompts), self.samples_per_prompt, *images.shape[1:])
        return image_grid(list(rows), max_columns=self.samples_per_prompt)

    def generate(
        self, prompts: Sequence[str], n: int, options: SamplingOptions | None = None
    ) -> torch.Tensor:
        """n images per prompt (prompt-major), image j from seed options.seed + j."""
        options = options or self.sampling
        repeated, seeds = per_prompt(prompts, n, options.seed)
        was_training = self.net.training
        self.net.eval()
        try:
            return sample(
                self.net,
                dict(self.noise_scheduler.config),
                repeated,
                seeds,
                self.latent_shape,
                options,
                vae=self.vae,
                text_encoder=self.text_encoder,
            )
        finally:
            self.net.train(was_training)

    # -- export: one folder a user can copy elsewhere and generate from ---------------------------
    def export(self, out_dir: Path) -> Path:
        """unet/ (the weights this module holds: the EMA after training), scheduler/, vae/ and
        text_encoder/ copies, and ldm_train_pipeline.json (what generate needs besides)."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self.net.save_pretrained(out_dir / "unet")
        self.noise_scheduler.save_pretrained(out_dir / "scheduler")
        vae, text_encoder = self._vae.module, self._text_encoder.module
        if vae is not None:
            vae.save_pretrained(out_dir / "vae")
        if text_encoder is not None:
            source = getattr(text_encoder, "source_dir", None)
            if source is None:
                raise UserError(
                    "the text encoder has no source_dir (its CLIP export folder) to copy"
                )
            shutil.copytree(source, out_dir / "text_encoder", dirs_exist_ok=True)
        index = {
            "unet": "unet",
            "scheduler": "scheduler",
            "vae": "vae" if vae is not None else None,
            "text_encoder": "text_encoder" if text_encoder is not None else None,
            "text_layer": self.text_layer,
            "image_size": self.image_size,
            "sampling": dataclasses.asdict(self.sampling),
            "prompts": self.prompts,
        }
        (out_dir / PIPELINE_FILE).write_text(json.dumps(index, indent=2))
        log.info("exported the U-Net pipeline to %s", out_dir)
        return out_dir


def unet_factory(**preset: Any) -> UnetFactory:
    """For code that builds a preset by hand (tests, notebooks): the partial the config makes."""
    return partial(UNet2DConditionModel, **preset)
