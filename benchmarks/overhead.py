"""Framework overhead per stage: steps/s of trainer.fit (our LightningModule, the config's
callbacks, our WebDataset loader with one worker) against a bare PyTorch loop that trains a copy of
the same net on the same batches, already decoded in memory, with the same optimizer. The bare
loop is the ceiling: the ratio is what Lightning, our module's bookkeeping (logging, EMA, seeded
generators) and the loader cost together (target >= 0.95)."""

from __future__ import annotations

import copy
import itertools
import tempfile
from collections.abc import Callable
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torch.optim.swa_utils import get_ema_multi_avg_fn

from benchmarks.common import (
    Clock,
    Rates,
    alternate,
    fit_rates,
    fit_ratio_line,
    make_data,
    setup_process,
    stage_config,
    write_upstream,
)
from ldm_train.data.datamodule import WebDataModule
from ldm_train.train import build

WARMUP = 3
RUNS = 3  # each side, alternated
# Steps per run and batch size per stage (clip: 128 instead of the preset's 512, to stay quick).
PLAN = {"unet": (12, []), "vae": (20, []), "clip": (8, ["data.batch_size=128"])}


def preload(cfg, count: int) -> list[dict]:
    data = cfg.data.copy()
    data.num_workers = 0
    return list(itertools.islice(iter(WebDataModule.from_config(data).train_dataloader()), count))


def unet_step(module, net) -> Callable[[dict], torch.Tensor]:
    """diffusers' train_text_to_image loop: encode, noise, predict, MSE to the target."""
    vae = module.latents.vae(module.device)
    text_encoder = module.conditioning.text_encoder(module.device)
    scheduler = module.noise_scheduler
    scale = vae.config.scaling_factor

    def step(batch: dict) -> torch.Tensor:
        with torch.no_grad():
            latents = vae.encode(batch["image"]).latent_dist.sample() * scale
            hidden_states = text_encoder(batch["caption"])[0]
        noise = torch.randn_like(latents)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(latents),))
        noisy = scheduler.add_noise(latents, noise, t)
        target = (
            scheduler.get_velocity(latents, noise, t)
            if scheduler.config.prediction_type == "v_prediction"
            else noise
        )
        return F.mse_loss(net(noisy, t, encoder_hidden_states=hidden_states).sample, target)

    return step


def vae_step(module, net) -> Callable[[dict], torch.Tensor]:
    kl_weight = module.loss.kl_weight

    def step(batch: dict) -> torch.Tensor:
        posterior = net.encode(batch["image"]).latent_dist
        reconstruction = net.decode(posterior.sample()).sample
        return F.mse_loss(reconstruction, batch["image"]) + kl_weight * posterior.kl().mean()

    return step


def clip_step(module, net) -> Callable[[dict], torch.Tensor]:
    loss = open_clip.ClipLoss()

    def step(batch: dict) -> torch.Tensor:
        tokens = module.tokenizer(batch["caption"])
        outputs = net(module.normalize(batch["image"]), tokens)
        return loss(outputs["image_features"], outputs["text_features"], outputs["logit_scale"])

    return step


STEPS = {"unet": unet_step, "vae": vae_step, "clip": clip_step}


def bare_rates(stage: str, cfg, batches: list[dict]) -> Rates:
    """A plain loop over the preloaded batches: loss, backward, optimizer and LR-schedule step, and
    the EMA update where the stage keeps one."""
    module = build(cfg.stage.module)
    net = copy.deepcopy(module.net).train()
    optimizer = instantiate(cfg.optimizer)(net.parameters())
    schedule = instantiate(cfg.lr_scheduler)(optimizer)
    step = STEPS[stage](module, net)
    ema_decay = getattr(module, "ema_decay", None)
    if ema_decay is not None:
        average = [p.detach().clone() for p in net.parameters()]
        ema = get_ema_multi_avg_fn(ema_decay)
    for index, batch in enumerate(batches):
        if index == WARMUP:
            clock = Clock()
        loss = step(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if ema_decay is not None:
            ema(average, [p.detach() for p in net.parameters()], torch.tensor(index))
    return clock.rates(len(batches) - WARMUP)


def main() -> None:
    setup_process()
    with tempfile.TemporaryDirectory() as tmp:
        root = make_data(Path(tmp) / "shapes-32")
        upstream = write_upstream(Path(tmp) / "upstream")
        for stage, (steps, extra) in PLAN.items():
            overrides = ["data.num_workers=1", *extra]
            if stage == "unet":
                overrides += [
                    f"stage.vae={upstream['vae']}",
                    f"stage.text_encoder={upstream['clip']}",
                ]
            cfg = stage_config(stage, root, Path(tmp) / "out", *overrides)
            batches = preload(cfg, WARMUP + steps)
            bare, framework = alternate(
                RUNS,
                lambda: bare_rates(stage, cfg, batches),  # noqa: B023 (called here)
                lambda: fit_rates(cfg, steps, WARMUP),  # noqa: B023
            )
            name = f"overhead {stage:4s} (batch {cfg.data.batch_size})"
            print(fit_ratio_line(name, framework, bare, "bare loop"), flush=True)


if __name__ == "__main__":
    main()
