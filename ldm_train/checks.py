"""Checks on a run's values before anything is built: each bad value is a one-line UserError that
names the key, the value and what would work, instead of a hang (data.batch_size=0 never fills a
batch) or a traceback from deep inside a library.

check_values(cfg) is the one entry point (train.validate calls it); unknown keys and choices are
checked elsewhere (config.check_overrides before Hydra composes, train.validate for choices).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig

from ldm_train.data.bucket_sizes import data_bucket_sizes
from ldm_train.errors import UserError
from ldm_train.formats.vae_folder import check_training_sizes, downsampling_factor, folder_factor


def check_values(cfg: DictConfig) -> None:
    data = cfg.data
    check_int("data.batch_size", data.batch_size, at_least=1)
    if data.get("val_batch_size") is not None:
        check_int("data.val_batch_size", data.val_batch_size, at_least=1)
    check_int("data.image_size", data.image_size, at_least=1)
    check_int("data.num_workers", data.num_workers, at_least=0)
    check_int("trainer.max_steps", cfg.trainer.get("max_steps", -1), at_least=-1, hint="-1: none")
    check_image_size(cfg)
    lr = cfg.get("model", {}).get("lr")
    if lr is not None and (not is_number(lr) or lr <= 0):
        raise UserError(f"model.lr={lr!r} must be a number > 0 (e.g. model.lr=1e-4)")
    check_devices(cfg.trainer)
    if cfg.get("adapter") and cfg.stage.name != "unet":  # only stage=unet's config reads it
        raise UserError(f"adapter=lora adapts stage=unet only, not stage={cfg.stage.name}")


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_int(key: str, value: Any, at_least: int, hint: str = "") -> None:
    if not is_number(value) or not float(value).is_integer() or value < at_least:
        note = f"; {hint}" if hint else ""
        raise UserError(f"{key}={value!r} must be an integer >= {at_least}{note}")


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
