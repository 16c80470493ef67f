"""python -m ldm_train.evaluate EXPORT_OR_CHECKPOINT [key=value ...] [--prompts-file F]
    [--val-urls URLS] [--n 4] [--sampler S] [--steps S] [--guidance G] [--seed N]
    [--batch-size B] [--clip DIR] [--features clip|inception] [--inception-weights F] [--out DIR]

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
The run's config is a file: its data.val_urls may name only local files (a pipe: or http URL is
refused; give it yourself with --val-urls). A sampling option not given is the export's.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from ldm_train import cli
from ldm_train.atomic import check_ours, write_folder
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
from ldm_train.rules import Int, Parser, typed
from ldm_train.rundir import RunDir
from ldm_train.safety import check_local_urls
from ldm_train.schema import check_config

log = logging.getLogger("ldm_train.evaluate")
KNOWN = ("metrics.json",)  # what marked evaluate's output before the marker file


def open_target(target: Path, scratch: Path, typed: set[str]) -> tuple[Path, DictConfig]:
    """(export folder, the run's config or an empty one) for an export, run dir or checkpoint.
    The run's config is a file: read as data (run_data); typed: the keys the user gives."""
    if (target / INDEX).is_file():
        run = RunDir(target.parent)  # an export in its run directory
        return target, run_data(run, typed) if run.config.is_file() else OmegaConf.create({})
    if target.is_dir() and not RunDir(target).checkpoints.is_dir():
        raise UserError(
            f"{target} is neither a unet export (no {INDEX}) nor a run directory (no "
            "checkpoints/): pass outputs/<experiment>/unet/export, the run dir or a .ckpt file"
        )
    checkpoint = find_checkpoint(target)
    run = RunDir.of_checkpoint(checkpoint)
    cfg = run_data(run, typed) if run.config.is_file() else OmegaConf.create({})
    stage = OmegaConf.select(cfg, "stage.name")
    if stage is not None and stage != "unet":
        raise UserError(f"{checkpoint} is a stage={stage} checkpoint; evaluate needs a unet run")
    return export_checkpoint(checkpoint, scratch / "export"), cfg


def run_data(run: RunDir, typed: set[str]) -> DictConfig:
    """A run's saved config, checked as data (RunDir.read_config, the schema); its
    data.val_urls, unless the user gives them, may name only local files (a pipe: URL from a
    file would run its shell command: ldm_train.safety.check_local_urls)."""
    cfg = run.read_config()
    try:
        check_config(cfg)
    except UserError as error:
        raise UserError(f"{run.config}: {error}") from None
    urls = OmegaConf.select(cfg, "data.val_urls")
    if urls and "data.val_urls" not in typed:
        check_local_urls(
            OmegaConf.to_object(urls) if OmegaConf.is_config(urls) else urls,
            "data.val_urls",
            run.config,
        )
    return cfg


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
    args: argparse.Namespace, cfg: DictConfig, pipeline: Pipeline, batch_size: int
) -> tuple[dict, ValidationSet | None, list[str], list[dict]]:
    """(data config, validation set or None, prompts, their labels)."""
    data = OmegaConf.to_container(cfg.get("data") or OmegaConf.create({}), resolve=True)
    validation = None
    if data.get("val_urls"):
        loader = loader_options(data, pipeline.image_size, batch_size)
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


def evaluate(args: argparse.Namespace, scratch: Path) -> tuple[dict, Callable[[Path], None]]:
    """Generate and measure; returns (metrics.json's content, what writes the output folder)."""
    typed = {o.split("=")[0].lstrip("+~") for o in args.overrides}
    typed |= {"data.val_urls"} if args.val_urls else set()
    export_dir, cfg = open_target(Path(args.target), scratch, typed)
    cfg = apply_overrides(cfg, args.overrides, args.val_urls)
    check_config(cfg)  # the user's overrides too: one line naming the key
    device = cli.device(args.device)
    pipeline = Pipeline.load(export_dir, device)
    options = cli.sampling_options(args, pipeline.sampling)
    data, validation, prompts, labels = read_inputs(args, cfg, pipeline, options.batch_size)
    clip_dir = clip_folder(args.clip, export_dir, cfg)
    features = args.features if validation is not None else None
    if features is None:
        log.info("no validation images (data.val_urls or --val-urls): no FD or KID")
    metrics = build_sample_metrics(
        clip_dir,
        features,
        args.inception_weights,
        zero_shot=data.get("zero_shot") if any(labels) else None,
        batch_size=options.batch_size,
    ).to(device)
    reference = validation.images[: args.max_reference] if validation is not None else []
    if len(reference):
        metrics.add_reference(reference.to(device))
    images = generate_measured(pipeline, prompts, labels, args.n, options, metrics, device)
    settings = {
        "target": str(args.target),
        "n_images": len(images),
        "n_prompts": len(prompts),
        "n_reference": len(reference),
        "features": features,
        "clip": str(clip_dir) if clip_dir else None,
        "sampling": asdict(options),
    }
    results = {**{k: float(v) for k, v in metrics.compute().items()}, "settings": settings}

    def write(folder: Path) -> None:
        save_images(images, prompts, args.n, options.seed, folder / "samples")
        (folder / "metrics.json").write_text(json.dumps(results, indent=2))

    return results, write


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = Parser("python -m ldm_train.evaluate", __doc__)
    parser.add_argument("target", help="a unet export folder, unet run directory or .ckpt file")
    parser.add_argument("overrides", nargs="*", help="key=value on the run's config (data.*)")
    cli.add_image_options(parser)
    cli.add_sampling_options(parser)
    parser.add_argument("--val-urls", help="reference shards (default: data.val_urls)")
    parser.add_argument("--clip", help="CLIP folder (default: the run's stage.text_encoder)")
    parser.add_argument("--features", choices=FEATURE_KINDS, default="clip", help="for FD/KID")
    parser.add_argument("--inception-weights", help="Inception-v3 FID weights file")
    count = typed(Int(1, 1_000_000))
    parser.add_argument("--max-reference", type=count, default=1000, help="validation images")
    parser.add_argument("--max-prompts", type=count, default=64, help="validation captions used")
    parser.add_argument("--out", default="evaluation", help="output folder (default ./evaluation)")
    return parser.parse_intermixed_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)

    def run() -> int:
        out = Path(args.out)
        check_ours(out, "--out", KNOWN)  # before the work, not after it
        with tempfile.TemporaryDirectory() as scratch:
            results, write = evaluate(args, Path(scratch))
        write_folder(out, write, "evaluation", "--out", KNOWN)
        figures = ", ".join(f"{k} {v:.4f}" for k, v in results.items() if k != "settings")
        print(f"{figures}; wrote {out / 'metrics.json'}")
        return 0

    return cli.run("ldm_train.evaluate", run)


if __name__ == "__main__":
    sys.exit(main())
