"""stage=all: train clip, then vae, then unet, each export feeding the next; then generate images
for the data's prompts and check them with the trained CLIP.

Each stage runs as `python -m ldm_train stage=<name> model=<name>/<preset> <the chain's settings for
it> <your overrides>` would: the same data, experiment, paths, trainer and logger options, so every
stage writes to outputs/<experiment>/<name>/. The U-Net stage gets the exports the chain made
(stage.vae=..., stage.text_encoder=...) before your overrides.
"""

from __future__ import annotations

import gc
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from hydra import compose
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from ldm_train import progress
from ldm_train.config import compose_config
from ldm_train.diffusion.pipeline import Pipeline
from ldm_train.diffusion.sampler import SamplingOptions
from ldm_train.diffusion.sizes import generate_sized, prompt_sizes, save_rows
from ldm_train.errors import UserError
from ldm_train.formats.clip_model import is_clip_folder
from ldm_train.metrics.prompt_accuracy import prompt_accuracy
from ldm_train.metrics.reference import (
    choose_prompts,
    loader_options,
    prompt_labels,
    read_validation,
)
from ldm_train.metrics.zero_shot import parse_zero_shot
from ldm_train.rundir import RunDir
from ldm_train.train import train

log = logging.getLogger(__name__)

STAGES = ("clip", "vae", "unet")
# Overrides of the chain itself, not of its stages.
CHAIN_ONLY = ("stage", "model", "hydra", "ckpt_path")


def user_overrides(cfg: DictConfig, overrides: Sequence[str] | None = None) -> list[str]:
    """The overrides the user gave for stage=all: from the CLI (HydraConfig), else from a config
    composed with return_hydra_config=True, else as passed."""
    if overrides is None:
        if HydraConfig.initialized():
            overrides = list(HydraConfig.get().overrides.task)
        elif "hydra" in cfg:
            overrides = list(cfg.hydra.overrides.task)
        else:
            raise UserError(
                "stage=all needs the overrides it was composed with: run `python -m ldm_train "
                "stage=all ...`, or compose_config([...], return_hydra_config=True), or call "
                "train_chain(cfg, overrides=[...])"
            )
    return [o for o in overrides if o.lstrip("+~").split("=")[0].split(".")[0] not in CHAIN_ONLY]


def stage_overrides(
    cfg: DictConfig, stage: str, user: Sequence[str], exports: dict[str, Path] | None = None
) -> list[str]:
    """What `python -m ldm_train` gets for one stage of the chain: the chain's settings, the
    upstream exports it made (unet: the clip and vae exports), then the user's overrides."""
    settings = cfg.stage.chain[stage]
    preset = cfg.model.get(stage, "tiny")
    # max_steps null: the preset's own (model.max_steps, else trainer's default); with a debug
    # preset (debug=fast) the preset's few steps.
    debugging = any(o.split("=")[0] == "debug" and not o.endswith("=null") for o in user)
    steps = None if debugging else settings.get("max_steps")
    upstream = {"vae": "stage.vae", "clip": "stage.text_encoder"} if stage == "unet" else {}
    return [
        f"stage={stage}",
        f"model={stage}/{preset}",
        *([f"trainer.max_steps={steps}"] if steps is not None else []),
        *settings.get("overrides", []),
        *[f"{key}='{exports[name]}'" for name, key in upstream.items() if name in (exports or {})],
        *user,
    ]


def compose_stage(overrides: list[str]) -> DictConfig:
    """compose_config, or Hydra's compose inside a running Hydra app (which holds GlobalHydra)."""
    if GlobalHydra.instance().is_initialized():
        return compose("config", overrides=overrides)
    return compose_config(overrides)


def train_stage(
    cfg: DictConfig, stage: str, user: Sequence[str], exports: dict[str, Path]
) -> tuple[dict, Path]:
    overrides = stage_overrides(cfg, stage, user, exports)
    log.info("chain: %s", " ".join(["python -m ldm_train", *overrides]))
    started = time.monotonic()
    metrics, objects = train(compose_stage(overrides))  # also exports, and ends its W&B run
    export_dir = objects["export_dir"] or RunDir(objects["run_dir"]).export  # other ranks
    minutes = (time.monotonic() - started) / 60
    log.info("chain: %s done in %.1f min; export in %s", stage, minutes, export_dir)
    del objects
    gc.collect()
    return {**metrics, "minutes": minutes}, export_dir


def chain_prompts(cfg: DictConfig, image_size: int) -> tuple[list[Any], list[str], list[dict]]:
    """(the prompts as given, their captions, their labels): data.prompts, or with none the first
    stage.evaluate.max_prompts captions of data.val_urls with their sample json (labels)."""
    configured = cfg.data.get("prompts")
    if configured:
        prompts = OmegaConf.to_container(configured, resolve=True)
        return prompts, *prompt_labels(prompts)
    if not cfg.data.get("val_urls"):
        return [], [], []
    data = OmegaConf.to_container(cfg.data, resolve=True)
    limit = cfg.stage.evaluate.get("max_prompts", 8)
    validation = read_validation(data["val_urls"], loader_options(data, image_size), limit)
    captions, labels = choose_prompts(None, validation, limit)
    return captions, captions, labels


def evaluate(cfg: DictConfig, unet_export: Path, clip_export: Path, out_dir: Path) -> dict:
    """Generate n images per prompt (data.prompts, else captions of the val shards), save them
    with a grid, and measure with the trained CLIP how many show what their prompt names (the
    data.zero_shot tasks, where the prompts carry labels)."""
    settings = cfg.stage.evaluate
    options = SamplingOptions(
        sampler=settings.sampler,
        steps=settings.steps,
        guidance=settings.guidance,
        seed=settings.seed,
        batch_size=settings.batch_size,
    )
    n = settings.n_per_prompt
    started = time.monotonic()
    on_gpu = torch.cuda.is_available() and cfg.trainer.accelerator in ("auto", "gpu", "cuda")
    pipeline = Pipeline.load(unet_export, "cuda" if on_gpu else "cpu")
    prompts, captions, labels = chain_prompts(cfg, pipeline.image_size)
    if not captions:
        log.info("chain: no data.prompts and no data.val_urls captions: nothing to generate")
        return {}
    # Each prompt at its own width x height, if it has one (ldm_train.diffusion.sizes).
    sizes = prompt_sizes(prompts, pipeline.image_size)
    with progress.shown():
        rows = generate_sized(pipeline, captions, sizes, n, options)
    save_rows(rows, captions, options.seed, out_dir)
    results: dict[str, Any] = {"generate_minutes": (time.monotonic() - started) / 60}
    per_image = [label for label in labels for _ in range(n)]
    tasks = parse_zero_shot(cfg.data.get("zero_shot"))
    if tasks and any(per_image) and is_clip_folder(clip_export):
        results |= prompt_accuracy(clip_export, rows, per_image, tasks)
    log.info("chain: %d images for %d prompts in %s (grid.png)", n * len(rows), len(rows), out_dir)
    return results


def train_chain(
    cfg: DictConfig, overrides: Sequence[str] | None = None
) -> tuple[dict[str, float], dict[str, Any]]:
    """Train clip -> vae -> unet and evaluate; returns (metrics, objects) like train()."""
    user = user_overrides(cfg, overrides)
    for stage in cfg.stage.chain:
        if stage not in STAGES:
            raise UserError(f"stage.chain.{stage}: not a stage; the chain has {', '.join(STAGES)}")
    started = time.monotonic()
    chain_run = RunDir(cfg.paths.run_dir)  # outputs/<experiment>/all: its config, images, results
    cfg.paths.run_dir = str(chain_run.path)  # chosen once (ldm_train.rundir.run_dir)
    chain_run.path.mkdir(parents=True, exist_ok=True)
    # As given (its optimizer reads each stage's model.lr): a rerun with other settings: all-2.
    chain_run.save_config(cfg, resolve=False)
    metrics: dict[str, float] = {}
    exports: dict[str, Path] = {}
    for stage in STAGES:
        stage_metrics, exports[stage] = train_stage(cfg, stage, user, exports)
        metrics |= {f"{stage}/{k}": v for k, v in stage_metrics.items()}
    run_dir = chain_run.path
    results = evaluate(cfg, exports["unet"], exports["clip"], run_dir / "samples")
    results["minutes"] = (time.monotonic() - started) / 60
    metrics |= {f"chain/{k}": v for k, v in results.items()}
    (run_dir / "results.json").write_text(json.dumps(metrics, indent=2))
    summary = ", ".join(f"chain/{k} {v:.3f}" for k, v in results.items())
    log.info("chain: %s; all metrics in %s", summary, run_dir / "results.json")
    return metrics, {"run_dir": run_dir, "exports": exports, "samples": run_dir / "samples"}
