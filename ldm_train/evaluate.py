"""python -m ldm_train.evaluate EXPORT_OR_CHECKPOINT [key=value ...] [--prompts-file F]
    [--val-urls URLS] [--n 4] [--steps S] [--clip DIR] [--features clip|inception]
    [--inception-weights F] [--out DIR]

Measures what a U-Net generates, so checkpoints and sweep jobs compare by their samples: generates
--n images per prompt and writes metrics.json (and the images) to --out:
- clip_score: mean cosine between each image and its prompt by a CLIP (--clip DIR; default: the
  run's stage.text_encoder when that is a CLIP folder, the experiment's stage=clip export);
- fd_clip, kid_clip (--features clip, the default) or fid_inception, kid_inception (--features
  inception --inception-weights FILE): Fréchet distance and KID to the validation images;
- <task>_acc, accuracy: with labelled prompts and data.zero_shot (the shapes data), the share of
  images the CLIP classifies as their prompt asks.

The target is a unet export folder (its run's config.yaml is read from the folder above, when
there), a unet run directory (checkpoints/last.ckpt) or a .ckpt file (exported to a temporary
folder first). key=value overrides apply to that config: data.val_urls=..., data.prompts=null (then
the first --max-prompts captions of the validation shards are the prompts), data.zero_shot=null.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from ldm_train import quiet
from ldm_train.diffusion.pipeline import INDEX, Pipeline, pipeline_part
from ldm_train.diffusion.sampler import SamplingOptions
from ldm_train.errors import UserError
from ldm_train.export import export_checkpoint, find_checkpoint
from ldm_train.formats.clip_model import is_clip_folder
from ldm_train.generate import read_prompts, save_images
from ldm_train.metrics.features import FEATURE_KINDS
from ldm_train.metrics.reference import (
    ValidationSet,
    choose_prompts,
    loader_options,
    read_validation,
)
from ldm_train.metrics.sample import SampleMetrics, build_sample_metrics
from ldm_train.rundir import RunDir

log = logging.getLogger("ldm_train.evaluate")


def open_target(target: Path, scratch: Path) -> tuple[Path, DictConfig]:
    """(export folder, the run's config or an empty one) for an export, run dir or checkpoint."""
    if (target / INDEX).is_file():
        config = RunDir(target.parent).config  # an export in its run directory
        return target, OmegaConf.load(config) if config.is_file() else OmegaConf.create({})
    if target.is_dir() and not RunDir(target).checkpoints.is_dir():
        raise UserError(
            f"{target} is neither a unet export (no {INDEX}) nor a run directory (no "
            "checkpoints/): pass outputs/<experiment>/unet/export, the run dir or a .ckpt file"
        )
    checkpoint = find_checkpoint(target)
    config_file = RunDir.of_checkpoint(checkpoint).config
    cfg = OmegaConf.load(config_file) if config_file.is_file() else OmegaConf.create({})
    stage = OmegaConf.select(cfg, "stage.name")
    if stage is not None and stage != "unet":
        raise UserError(f"{checkpoint} is a stage={stage} checkpoint; evaluate needs a unet run")
    return export_checkpoint(checkpoint, scratch / "export"), cfg


def apply_overrides(cfg: DictConfig, overrides: Sequence[str], val_urls: str | None) -> DictConfig:
    bad = [o for o in overrides if "=" not in o or o.startswith("-")]
    if bad:
        raise UserError(
            f"unexpected argument {bad[0]!r}: overrides are key=value (data.val_urls=..)"
        )
    cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    if val_urls:
        OmegaConf.update(cfg, "data.val_urls", val_urls)
    return cfg


def clip_folder(explicit: str | None, export_dir: Path, cfg: DictConfig) -> Path | None:
    """--clip DIR; else the export's text encoder if it is a CLIP folder (exports before
    model_index.json); else the run's stage.text_encoder if that is one (the experiment's stage=clip
    export); else None."""
    if explicit:
        return Path(explicit)
    for candidate in (
        pipeline_part(export_dir, "text_encoder"),
        cfg.get("stage", {}).get("text_encoder"),
    ):
        if candidate and is_clip_folder(candidate):
            return Path(candidate)
    log.info("no CLIP folder (--clip DIR) for clip_score, CLIP features or accuracy")
    return None


def generate_measured(
    pipeline: Pipeline,
    prompts: list[str],
    labels: list[dict],
    n: int,
    options: SamplingOptions,
    metrics: SampleMetrics,
    device: str,
) -> torch.Tensor:
    """n images per prompt, a few prompts per call (the progress bar moves), each batch measured
    as it comes. Image j of a prompt starts from seed + j, however the prompts are grouped."""
    per_call = max(1, options.batch_size // n)
    conditional = pipeline.text_encoder is not None
    images = []
    with tqdm(total=len(prompts) * n, desc="generating", unit="img") as progress:
        for start in range(0, len(prompts), per_call):
            chunk = slice(start, start + per_call)
            batch = pipeline.generate(prompts[chunk], n, options)
            repeated = [p for p in prompts[chunk] for _ in range(n)]
            metrics.update(
                batch.to(device),
                repeated if conditional else None,
                [lab for lab in labels[chunk] for _ in range(n)] if labels else None,
            )
            images.append(batch)
            progress.update(len(batch))
    return torch.cat(images)


def read_inputs(
    args: argparse.Namespace, cfg: DictConfig, pipeline: Pipeline
) -> tuple[dict, ValidationSet | None, list[str], list[dict]]:
    """(data config, validation set or None, prompts, their labels)."""
    data = OmegaConf.to_container(cfg.get("data") or OmegaConf.create({}), resolve=True)
    validation = None
    if data.get("val_urls"):
        loader = loader_options(data, pipeline.image_size, args.batch_size)
        limit = max(args.max_reference, args.max_prompts)
        validation = read_validation(data["val_urls"], loader, limit)
    if args.prompts_file:
        prompts, labels = read_prompts(None, args.prompts_file), []
    else:
        prompts, labels = choose_prompts(data.get("prompts"), validation, args.max_prompts)
    if not prompts:  # an export copied without its run's config: the prompts it was trained with
        prompts, labels = list(pipeline.prompts), []
    if not prompts:
        if pipeline.text_encoder is not None:
            raise UserError("no prompts: give --prompts-file, data.prompts=[...] or data.val_urls")
        prompts = [""]  # an unconditional model
    return data, validation, prompts, labels


def evaluate(args: argparse.Namespace, scratch: Path) -> dict:
    """Generate, measure, save the images; returns metrics.json's content."""
    export_dir, cfg = open_target(Path(args.target), scratch)
    cfg = apply_overrides(cfg, args.overrides, args.val_urls)
    pipeline = Pipeline.load(export_dir, args.device)
    data, validation, prompts, labels = read_inputs(args, cfg, pipeline)
    clip_dir = clip_folder(args.clip, export_dir, cfg)
    features = args.features if validation is not None else None
    if features is None:
        log.info("no validation images (data.val_urls or --val-urls): no FD or KID")
    metrics = build_sample_metrics(
        clip_dir,
        features,
        args.inception_weights,
        zero_shot=data.get("zero_shot") if any(labels) else None,
        batch_size=args.batch_size,
    ).to(args.device)
    reference = validation.images[: args.max_reference] if validation is not None else []
    if len(reference):
        metrics.add_reference(reference.to(args.device))
    options = replace(
        pipeline.sampling,
        steps=pipeline.sampling.steps if args.steps is None else args.steps,
        guidance=pipeline.sampling.guidance if args.guidance is None else args.guidance,
        seed=args.seed,
        batch_size=args.batch_size,
    )
    images = generate_measured(pipeline, prompts, labels, args.n, options, metrics, args.device)
    save_images(images, prompts, args.n, options.seed, Path(args.out) / "samples")
    settings = {
        "target": str(args.target),
        "n_images": len(images),
        "n_prompts": len(prompts),
        "n_reference": len(reference),
        "features": features,
        "clip": str(clip_dir) if clip_dir else None,
        "sampling": asdict(options),
    }
    return {**{k: float(v) for k, v in metrics.compute().items()}, "settings": settings}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m ldm_train.evaluate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("target", help="a unet export folder, unet run directory or .ckpt file")
    parser.add_argument("overrides", nargs="*", help="key=value on the run's config (data.*)")
    parser.add_argument("--prompts-file", help="one prompt per line (default: data.prompts)")
    parser.add_argument("--val-urls", help="reference shards (default: data.val_urls)")
    parser.add_argument("--n", type=int, default=4, help="images per prompt (default 4)")
    parser.add_argument("--steps", type=int, help="sampling steps (default: the export's)")
    parser.add_argument("--guidance", type=float, help="guidance scale (default: the export's)")
    parser.add_argument("--seed", type=int, default=0, help="image j starts from seed + j")
    parser.add_argument("--clip", help="CLIP folder (default: the run's stage.text_encoder)")
    parser.add_argument("--features", choices=FEATURE_KINDS, default="clip", help="for FD/KID")
    parser.add_argument("--inception-weights", help="Inception-v3 FID weights file")
    parser.add_argument("--max-reference", type=int, default=1000, help="validation images used")
    parser.add_argument("--max-prompts", type=int, default=64, help="validation captions used")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="evaluation", help="output folder (default ./evaluation)")
    return parser.parse_intermixed_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    quiet.install()  # library notes a user cannot act on (ldm_train/quiet.py)
    try:
        for option in ("n", "max_reference", "max_prompts", "batch_size"):
            if getattr(args, option) < 1:
                raise UserError(f"--{option.replace('_', '-')} must be at least 1")
        with tempfile.TemporaryDirectory() as scratch:
            results = evaluate(args, Path(scratch))
    except UserError as error:
        print(f"ldm_train.evaluate: error: {error}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(results, indent=2))
    figures = ", ".join(f"{k} {v:.4f}" for k, v in results.items() if k != "settings")
    print(f"{figures}; wrote {out / 'metrics.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
