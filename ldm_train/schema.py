"""The types and ranges of every user-facing key of the config tree, in one table, checked before
anything is built (check_config): a wrong value is one line naming the key, the value and what is
allowed. Keys a config does not have (another stage's, an optimizer's option another optimizer
lacks) are skipped; unknown keys and group choices are checked before Hydra composes
(config.check_overrides); what depends on several keys or on the machine is in ldm_train.checks.

The sampling options' rules are the sampler's (diffusion.sampler.SAMPLING_RULES): the same for the
validation samples, the chain's final images and the commands' --sampler/--steps/--guidance.
"""

from __future__ import annotations

import re
from typing import Any, get_args

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from ldm_train.adapters.lora import ADAPTER_RULES
from ldm_train.diffusion.sampler import SAMPLING_RULES
from ldm_train.errors import UserError, first_line
from ldm_train.rules import SEED, Choice, Either, Flag, Int, Numbers, Real, Rule, Text, Texts


def precisions() -> list[Any]:
    from lightning.fabric.connector import _PRECISION_INPUT

    return [value for part in get_args(_PRECISION_INPUT) for value in get_args(part)]


def accelerators() -> list[str]:
    from lightning.pytorch.accelerators import AcceleratorRegistry

    return ["auto", "gpu", *sorted(AcceleratorRegistry.available_accelerators())]


def choices(module: str, name: str):
    """The choices a module declares (one home for each set), read when a check runs."""

    def read() -> tuple:
        import importlib

        return getattr(importlib.import_module(module), name)

    return read


COUNT = Int(1)  # batch sizes, steps, ...: at least one
SIZE = Int(0)  # cache sizes, counts that may be none
PROBABILITY = Real(0, 1)
NON_NEGATIVE = Real(0)
POSITIVE = Real(0, low_open=True)


class Devices(Rule):
    """trainer.devices: a count, -1 or auto (all), or GPU indices (a list, or "0,1")."""

    allowed = "a count >= 1, -1 or auto (all), or device indices such as [0,1] or '0,1'"

    def fits(self, value: Any) -> bool:
        if isinstance(value, str):
            text = value.strip()
            if "," in text:
                value = [i.strip() for i in text.split(",") if i.strip()]
                return bool(value) and all(i.isdigit() for i in value)
            value = int(text) if text.lstrip("-").isdigit() else text
        if isinstance(value, list | tuple):
            return bool(value) and all(Int(0).fits(i) for i in value)
        return value == "auto" or value == -1 or Int(1).fits(value)


DEVICES = Devices()

TABLE: dict[str, Rule] = {
    # the run
    "seed": SEED,
    "experiment_name": Text(plain=True),
    "resume": Choice(choices("ldm_train.rundir", "RESUME_MODES")),
    "ckpt_path": Text(null=True),
    "checkpoint_every_n_steps": COUNT,
    "keep_last_checkpoints": Int(-1, hint="-1: all"),
    "max_nonfinite_steps": COUNT,
    "stage.name": Choice(("clip", "vae", "unet", "all")),
    # trainer (every key passes to lightning.Trainer)
    "trainer.accelerator": Choice(accelerators),
    "trainer.devices": DEVICES,
    "trainer.num_nodes": COUNT,
    "trainer.precision": Choice(precisions),
    "trainer.max_steps": Int(-1, hint="-1: none"),
    "trainer.max_epochs": Int(-1, null=True, hint="-1: none"),
    "trainer.log_every_n_steps": COUNT,
    "trainer.check_val_every_n_epoch": Int(1, null=True),
    "trainer.val_check_interval": Either((Int(1), Real(0, 1, low_open=True)), null=True),
    "trainer.limit_val_batches": Either((Int(0), PROBABILITY), null=True),
    "trainer.limit_train_batches": Either((Int(0), PROBABILITY), null=True),
    "trainer.num_sanity_val_steps": Int(-1),
    "trainer.gradient_clip_val": Real(0, null=True),
    "trainer.accumulate_grad_batches": COUNT,
    "trainer.enable_progress_bar": Flag(),
    "trainer.benchmark": Flag(null=True),
    # data
    "data.train_urls": Texts(),
    "data.val_urls": Texts(null=True),
    "data.image_size": Int(1, 16384),
    "data.channels": Choice((3,)),
    "data.batch_size": COUNT,
    "data.val_batch_size": Int(1, null=True),
    "data.num_workers": SIZE,
    "data.shuffle_buffer": SIZE,
    "data.seed": SEED,
    "data.image_keys": Texts(),
    "data.caption_keys": Texts(),
    "data.random_flip": Flag(),
    "data.crop": Choice(("center", "random")),
    "data.batches_per_epoch": COUNT,  # 0 looped over empty epochs forever
    "data.bucket_max_ratio": Real(1, null=True),
    "data.bucket_step": COUNT,
    "data.bucket_cap": Int(0, null=True),
    # model presets
    "model.pretrained": Text(null=True),
    "model.lr": POSITIVE,
    "model.weight_decay": NON_NEGATIVE,
    "model.betas": Numbers(Real(0, 1)),
    "model.eps": POSITIVE,
    "model.warmup_steps": SIZE,
    "model.ema_decay": Real(0, 1, null=True),
    "model.beta_schedule": Choice(choices("ldm_train.diffusion.schedule", "BETA_SCHEDULES")),
    "model.prediction_type": Choice(choices("ldm_train.diffusion.schedule", "PREDICTION_TYPES")),
    "model.snr_gamma": Real(0, low_open=True, null=True),
    "model.kl_weight": NON_NEGATIVE,
    "model.reconstruction": Choice(("l1", "l2")),
    "model.posterior_logvar_init": Real(null=True),
    "model.context_length": COUNT,
    "model.batch_size": COUNT,
    "model.max_steps": Int(-1),
    # optimizer and lr_scheduler groups (each option where the chosen file has it)
    "optimizer.lr": POSITIVE,
    "optimizer.weight_decay": NON_NEGATIVE,
    "optimizer.momentum": NON_NEGATIVE,
    "optimizer.betas": Numbers(Real(0, 1)),
    "optimizer.eps": POSITIVE,
    "optimizer.nesterov": Flag(),
    "optimizer.fused": Flag(null=True),
    "lr_scheduler.name": Choice(choices("ldm_train.optim", "SCHEDULES")),
    "lr_scheduler.warmup_steps": SIZE,
    "lr_scheduler.num_cycles": COUNT,
    "lr_scheduler.power": POSITIVE,
    # speed switches
    "perf.channels_last": Flag(),
    "perf.compile": Flag(),
    "perf.compile_backend": Text(),
    "perf.gradient_checkpointing": Flag(),
    "perf.attention": Choice(choices("ldm_train.perf", "ATTENTION_KINDS")),
    # stages
    "stage.text_layer": Choice(choices("ldm_train.diffusion.text_encoder", "TEXT_LAYERS")),
    "stage.vae": Text(null=True),
    "stage.text_encoder": Text(null=True),
    "stage.module.loss.perceptual_weight": NON_NEGATIVE,
    "stage.module.loss.disc_weight": NON_NEGATIVE,
    "stage.module.loss.disc_start": SIZE,
    "stage.module.loss.offset_noise": NON_NEGATIVE,
    "stage.module.loss.discriminator.channels": COUNT,
    "stage.module.loss.discriminator.n_layers": COUNT,
    "stage.module.grid_images": SIZE,
    "stage.module.local_loss": Flag(),
    "stage.module.gather_with_grad": Flag(),
    "stage.module.noise_scheduler.num_train_timesteps": Int(1, 100_000),
    "stage.module.noise_scheduler.beta_start": POSITIVE,
    "stage.module.noise_scheduler.beta_end": POSITIVE,
    "stage.module.noise_scheduler.rescale_betas_zero_snr": Flag(),
    "stage.module.conditioning.caption_dropout": PROBABILITY,
    "stage.module.conditioning.cache_size": SIZE,
    "stage.module.latents.cache_size": SIZE,
    "stage.module.validation.timesteps": COUNT,
    "stage.module.validation.max_prompts": COUNT,
    "stage.module.validation.samples_per_prompt": SIZE,
    "stage.module.validation.every_n_validations": SIZE,
    "stage.module.validation.metric_images": SIZE,
    "stage.module.validation.max_reference": SIZE,
    "stage.module.validation.metrics.batch_size": COUNT,
    **{f"stage.module.validation.sampling.{k}": rule for k, rule in SAMPLING_RULES.items()},
    **{f"stage.evaluate.{k}": rule for k, rule in SAMPLING_RULES.items()},
    **{f"adapter.{k}": rule for k, rule in ADAPTER_RULES.items()},
    "stage.evaluate.n_per_prompt": COUNT,
}

ABSENT = object()
MISSING_IN = re.compile(r"Missing mandatory value: ([\w.]+)")


def value_at(cfg: DictConfig, key: str) -> Any:
    """The resolved value at a dotted key; ABSENT when the config has no such key."""
    try:
        value = OmegaConf.select(cfg, key, default=ABSENT, throw_on_missing=True)
    except MissingMandatoryValue:
        raise UserError(f"{key} is not set (???): give it, e.g. {key}=...") from None
    except OmegaConfBaseException as error:
        # A key whose interpolation reads an unset one (experiment_name <- data.train_urls): that
        # one is what to give.
        missing = MISSING_IN.search(str(error))
        if missing is not None:
            unset = missing.group(1)
            raise UserError(f"{unset} is not set (???): give it, e.g. {unset}=...") from None
        raise UserError(f"{key}: {first_line(error)}") from None
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    return value


def check_config(cfg: DictConfig, table: dict[str, Rule] | None = None) -> None:
    """Each key of the table the config has, checked against its rule (one line for the first
    that does not fit)."""
    for key, rule in (table or TABLE).items():
        value = value_at(cfg, key)
        if value is not ABSENT:
            rule.check(key, value)
