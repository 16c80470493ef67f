"""Checks on a run's values before anything is built: each bad value is a one-line UserError that
names the key, the value and what would work, instead of a hang (data.batch_size=0 never fills a
batch) or a traceback from deep inside a library.

check_values(cfg) is the one entry point (train.validate calls it): the types and ranges of every
key (ldm_train.schema's table), then what depends on several keys or on the machine (here).
Unknown keys and choices are checked elsewhere (config.check_overrides before Hydra composes,
train.validate for choices).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from ldm_train.data.bucket_sizes import data_bucket_sizes
from ldm_train.errors import UserError
from ldm_train.formats.vae_folder import check_training_sizes, downsampling_factor, folder_factor
from ldm_train.rules import is_number
from ldm_train.schema import check_config

RESNET_REDUCTION = 32  # open_clip's ModifiedResNet: the attention pool's grid is image_size / 32


def check_values(cfg: DictConfig) -> None:
    check_config(cfg)
    check_image_size(cfg)
    check_clip_size(cfg)
    check_schedule(cfg)
    check_devices(cfg.trainer)
    if cfg.get("adapter") and cfg.stage.name != "unet":  # only stage=unet's config reads it
        raise UserError(f"adapter=lora adapts stage=unet only, not stage={cfg.stage.name}")


def check_schedule(cfg: DictConfig) -> None:
    """diffusers' polynomial schedule divides by (training - warmup) steps once the warmup ends:
    equal counts stop the run at its last step. (The other options of a schedule are read only
    after the warmup: the table checks their types up front.)"""
    schedule = cfg.get("lr_scheduler") or {}
    warmup, steps = schedule.get("warmup_steps"), schedule.get("training_steps")
    if schedule.get("name") == "polynomial" and warmup == steps and isinstance(steps, int):
        raise UserError(
            f"lr_scheduler.warmup_steps={warmup} equals trainer.max_steps: lr_scheduler="
            "polynomial decays after its warmup and needs steps left to decay over (lower "
            "model.warmup_steps)"
        )


def check_clip_size(cfg: DictConfig) -> None:
    """The image tower's size must divide into its grid: by the patch size (ViT) or by 32
    (ModifiedResNet, layers given as a list)."""
    net = OmegaConf.select(cfg, "stage.module.net")  # the stage's clip_net: a preset's card
    if cfg.stage.name != "clip" or not isinstance(net, DictConfig) or net.get("pretrained"):
        return
    vision = OmegaConf.select(net, "net.vision_cfg") or {}
    size = vision.get("image_size")
    layers = vision.get("layers")
    step = RESNET_REDUCTION if isinstance(layers, list | ListConfig) else vision.get("patch_size")
    if isinstance(size, int) and isinstance(step, int) and step > 0 and size % step:
        fits = max(step, round(size / step) * step)
        raise UserError(
            f"data.image_size={size} does not divide into the CLIP image tower's grid of {step} "
            f"px cells (model.net.vision_cfg): use e.g. data.image_size={fits}"
        )


def check_image_size(cfg: DictConfig) -> None:
    """data.image_size and the buckets against the VAE's downsampling factor (formats/vae_folder.py)."""
    factor, source = vae_factor(cfg)
    check_training_sizes(cfg.data.image_size, data_bucket_sizes(cfg.data), factor, source)


def vae_factor(cfg: DictConfig) -> tuple[int, str]:
    """(the VAE's downsampling factor, where it comes from); 1 where no VAE is involved."""
    stage = cfg.stage.name
    if stage == "vae":
        channels = cfg.model.net.get("block_out_channels")
        if channels is not None:
            return downsampling_factor(channels), f"the VAE preset ({cfg.model.get('name')})"
    if stage == "unet" and cfg.stage.get("vae") is not None:
        found = folder_factor(cfg.stage.vae)  # a missing or unreadable VAE is the stage's own error
        if found is not None:
            return found[0], f"the VAE at {found[1]}"
    return 1, ""


def check_devices(trainer: DictConfig) -> None:
    """More processes than the machine has: Lightning starts them all on a CPU (they share the
    cores, each slower than one alone) and fails with a traceback on GPUs."""
    devices, accelerator = trainer.get("devices", "auto"), trainer.get("accelerator", "auto")
    wanted = device_count(devices)
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        have, unit = torch.cuda.device_count(), "GPU(s) visible (torch.cuda.device_count())"
        if have == 0:
            raise UserError(
                f"trainer.accelerator={accelerator} but no GPU is visible: "
                "use trainer.accelerator=cpu, or check CUDA_VISIBLE_DEVICES and the driver"
            )
    elif accelerator in ("cpu", "auto"):
        have, unit = cpu_cores(), "CPU cores"
    else:
        return  # other accelerators: Lightning checks them
    if wanted is not None and wanted > have:
        raise UserError(
            f"trainer.devices={devices} asks for more than the {have} {unit} of this machine: "
            f"use trainer.devices={have} or fewer (or trainer.devices=auto)"
        )


def device_count(devices: Any) -> int | None:
    """Devices a trainer.devices value asks for (a count, or GPU indices: the highest + 1);
    None for all available (auto, -1) or a value Lightning reports itself."""
    if isinstance(devices, str):
        text = devices.strip()
        if "," in text:
            devices = [int(i) for i in text.split(",") if i.strip().lstrip("-").isdigit()]
        elif text.lstrip("-").isdigit():
            devices = int(text)
    if isinstance(devices, (list, tuple, ListConfig)):
        indices = [int(i) for i in devices]
        return max(indices) + 1 if indices else None
    if is_number(devices) and devices > 0:
        return int(devices)
    return None


def cpu_cores() -> int:
    """Cores this process may run on (its affinity: e.g. what SLURM or taskset gave it)."""
    if hasattr(os, "sched_getaffinity"):  # Linux
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1
