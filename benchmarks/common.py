"""What the benchmarks share: a copy of the embedded dataset, the real config of a stage with its
tiny preset, and steps/s of a Lightning fit measured between two batches (start-up excluded)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from ldm_train.config import compose_config
from ldm_train.data.datamodule import WebDataModule
from ldm_train.data.shapes import make_shapes_dataset
from ldm_train.data.shards import shard_path, shard_urls
from ldm_train.train import build, build_callbacks

# One core for the training process, the other for a loader worker: the two cores of the
# reference machine, and figures that depend less on how many threads torch picks.
TORCH_THREADS = int(os.environ.get("BENCH_TORCH_THREADS", "1"))
TRAIN_SHARDS = 8


def setup_process() -> None:
    torch.set_num_threads(TORCH_THREADS)
    os.environ.setdefault("WANDB_MODE", "offline")


def make_data(root: Path, n_train: int = 2048, image_size: int = 32, **options) -> Path:
    """The shapes dataset in TRAIN_SHARDS shards under root, once (options: e.g. canvases)."""
    if not shard_path(root, "train", TRAIN_SHARDS - 1).is_file():
        make_shapes_dataset(
            root,
            image_size=image_size,
            n_train=n_train,
            n_val=64,
            train_shards=TRAIN_SHARDS,
            val_shards=1,
            progress=False,
            **options,
        )
    return root


def train_urls(root: Path) -> str:
    return shard_urls(root, "train", TRAIN_SHARDS)


def stage_config(stage: str, root: Path, out: Path, *overrides: str) -> DictConfig:
    """The stage's real config (tiny preset), on the benchmark's shards, no logger, no validation."""
    return compose_config(
        [
            f"stage={stage}",
            f"paths.output_root={out}",
            f"data.train_urls='{train_urls(root)}'",
            "data.val_urls=null",
            "data.make_dataset=null",
            "data.shuffle_buffer=256",
            "logger=none",
            "trainer.accelerator=cpu",
            "trainer.enable_progress_bar=false",
            "trainer.limit_val_batches=0",
            *overrides,
        ]
    )


def write_upstream(out: Path) -> dict[str, Path]:
    """Randomly initialised tiny VAE and CLIP exports: what stage=unet loads (its speed does not
    depend on their weights)."""
    vae_cfg = stage_config("vae", out, out)
    vae = instantiate(vae_cfg.model.net, scaling_factor=1.0)
    vae.save_pretrained(out / "vae")
    clip = build(stage_config("clip", out, out).stage.module)
    clip.export(out / "clip")
    return {"vae": out / "vae", "clip": out / "clip"}


class Clock:
    """Wall time and this process's CPU time. On a shared machine the wall time of a run depends on
    what else runs; the CPU time the training process spends per step does much less (work done in
    loader worker processes is not in it: that is what workers are for)."""

    def __init__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def rates(self, steps: int) -> Rates:
        return Rates(
            steps / (time.process_time() - self.cpu), steps / (time.perf_counter() - self.wall)
        )


@dataclass
class Rates:
    cpu: float  # steps per CPU second of the training process
    wall: float  # steps per second of wall time


class StepTimer(L.Callback):
    """Rates from the start of the step after `warmup` ones to the end of the last step."""

    def __init__(self, warmup: int):
        self.warmup, self.clock, self.rates = warmup, None, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.warmup and self.clock is None:
            self.clock = Clock()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.clock is not None:
            self.rates = self.clock.rates(trainer.global_step - self.warmup)


def fit_rates(
    cfg: DictConfig, steps: int, warmup: int, module: L.LightningModule | None = None
) -> Rates:
    """Steps/s of trainer.fit (the config's callbacks, the stage's own, our loader) over `steps`
    steps after `warmup` ones."""
    datamodule = WebDataModule.from_config(cfg.data)
    module = module if module is not None else build(cfg.stage.module)
    timer = StepTimer(warmup)
    trainer = instantiate(
        cfg.trainer,
        max_steps=warmup + steps,
        logger=False,
        callbacks=[*build_callbacks(cfg, None), timer],
        default_root_dir=str(cfg.paths.run_dir),
    )
    trainer.fit(module, datamodule=datamodule)
    return timer.rates


def ratio_line(name: str, value: float, baseline: float, unit: str, what: str) -> str:
    return f"{name}: {value:8.2f} {unit} vs {baseline:8.2f} {what} = {value / baseline:.2f}x"


def fit_ratio_line(name: str, ours: list[Rates], baseline: list[Rates], what: str) -> str:
    """The best steps per CPU second of our runs against the baseline's, then the best wall rates."""
    cpu = best(r.cpu for r in ours), best(r.cpu for r in baseline)
    wall = best(r.wall for r in ours), best(r.wall for r in baseline)
    return (
        ratio_line(name, *cpu, "steps/cpu-s", what)
        + f"; wall: {wall[0]:.2f} vs {wall[1]:.2f} steps/s = {wall[0] / wall[1]:.2f}x"
    )


def alternate(runs: int, *measures) -> list[list[float]]:
    """Each measure called `runs` times, interleaved (a, b, a, b, ...): load on the machine
    changes slowly, so alternating spreads it over both sides."""
    results: list[list[float]] = [[] for _ in measures]
    for _ in range(runs):
        for result, measure in zip(results, measures, strict=True):
            result.append(measure())
    return results


def best(values: Iterable[float]) -> float:
    """The fastest run: noise from other processes only ever slows a run down."""
    return max(values)
