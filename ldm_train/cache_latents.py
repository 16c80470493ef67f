"""python -m ldm_train.cache_latents: encode the training shards once with the frozen VAE and text
encoder, so that stage=unet trains from the results instead of running both at every step.

    python -m ldm_train.cache_latents [--out DIR] [--dtype float16] [OVERRIDES ...]
    python -m ldm_train stage=unet "data.train_urls='DIR/train-{000000..000015}.tar'"

OVERRIDES are the stage=unet command's (data=..., data.image_size=..., stage.vae=...,
stage.text_encoder=..., stage.text_layer=...): the cache is made with exactly the parts and image
transforms that run would use. One output shard per input shard, same order and sample keys, each
sample holding
    latent.npy       the VAE encoder's moments, 2C x h x w (mean, log-variance): the latent is
                     sampled from this Gaussian at every step, with the step's generator, as it is
                     when encoding on the fly (the same x0 bit for bit in float32)
    latent_flip.npy  the same for the mirrored image, when data.random_flip is on (the loader picks
                     one with the draw that would have flipped the image)
    text.npy         the text encoder's hidden states, L x D (caption dropout is applied at train
                     time: dropped rows get the empty caption's hidden states)
    txt, json        the caption and the metadata, as in the source
plus cache.json beside the shards (what made it). The training stream (shuffle, resume, DDP and
worker split) is the same code as for images. Shards are written atomically and ones already there
are kept, so an interrupted run continues where it stopped; --part K/N caches every N-th shard from
the K-th, for N processes (or machines) sharing the work.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from omegaconf import DictConfig

from ldm_train import cli, progress
from ldm_train.atomic import claim_folder, write_json, written_beside
from ldm_train.checks import check_values
from ldm_train.config import check_overrides, compose_config
from ldm_train.data.bucket_batches import shape_of
from ldm_train.data.datamodule import WebDataModule, check_shards_exist
from ldm_train.data.shards import shard_path, shard_urls
from ldm_train.data.stream import (
    LATENT_FLIP_KEY,
    LATENT_KEY,
    TEXT_KEY,
    StreamStats,
    batched,
    decode_sample,
    image_transform,
    read_pass,
)
from ldm_train.diffusion.conditioning import text_context
from ldm_train.diffusion.latents import vae_moments
from ldm_train.errors import UserError
from ldm_train.formats.vae_folder import vae_scale_factor
from ldm_train.rules import Parser, typed

log = logging.getLogger(__name__)

INFO_FILE = "cache.json"
DTYPES = {"float32": np.float32, "float16": np.float16}


@torch.inference_mode()
def encode_batch(
    samples: list[dict], vae, text_encoder, flips: bool, device: torch.device
) -> list[dict[str, np.ndarray]]:
    """Latent moments (and those of the mirrored images) and hidden states of decoded samples."""
    images = torch.stack([s["image"] for s in samples]).to(device)
    arrays: dict[str, torch.Tensor] = {LATENT_KEY: vae_moments(vae, images)}
    if flips:
        arrays[LATENT_FLIP_KEY] = vae_moments(vae, images.flip(-1))
    if text_encoder is not None:
        captions = [s["caption"] for s in samples]
        arrays[TEXT_KEY] = text_context(text_encoder, captions, text_encoder.width, device)
    as_numpy = {name: value.float().cpu().numpy() for name, value in arrays.items()}
    return [{name: value[i] for name, value in as_numpy.items()} for i in range(len(samples))]


def encode_by_shape(samples: list[dict], *parts: Any) -> list[dict[str, np.ndarray]]:
    """encode_batch for each image shape among the samples (aspect-ratio buckets: each sample's
    latent at its bucket's size), the results in the samples' order."""
    encoded: list[dict[str, np.ndarray]] = [{} for _ in samples]
    for shape in dict.fromkeys(shape_of(sample) for sample in samples):
        indices = [i for i, sample in enumerate(samples) if shape_of(sample) == shape]
        arrays = encode_batch([samples[i] for i in indices], *parts)
        for i, sample_arrays in zip(indices, arrays, strict=True):
            encoded[i] = sample_arrays
    return encoded


def cache_shard(
    url: str,
    out_file: Path,
    data_cfg: Any,
    vae,
    text_encoder,
    batch_size: int,
    dtype: np.dtype,
    device: torch.device,
) -> StreamStats:
    """One source shard -> one cache shard (written to a temporary name, then moved into place)."""
    stats = StreamStats()
    transform = image_transform(data_cfg, train=False)  # resize + centre crop (buckets'), no flip
    decoded = (
        sample
        for raw in read_pass([url], 0, 1, stats, option="data.train_urls")
        if safe_key(raw, stats) and (sample := decode_sample(raw, data_cfg, transform, stats))
    )
    with written_beside(out_file) as partial, wds.TarWriter(str(partial)) as sink:
        for samples in batched(decoded, batch_size):
            encoded = encode_by_shape(samples, vae, text_encoder, data_cfg.random_flip, device)
            for sample, arrays in zip(samples, encoded, strict=True):
                record = {"__key__": sample["key"], "txt": sample["caption"]}
                if sample["meta"]:
                    record["json"] = sample["meta"]
                record.update({name: value.astype(dtype) for name, value in arrays.items()})
                sink.write(record)
    return stats


def safe_key(raw: dict, stats: StreamStats) -> bool:
    """A sample key becomes member names in the cache shard: one that would land outside the
    folder it is extracted in (absolute, or with a '..' part) is skipped and counted."""
    key = str(raw.get("__key__", ""))
    parts = key.replace("\\", "/").split("/")
    if not parts[0] or ".." in parts or parts[0][1:2] == ":":  # absolute, up, a drive
        stats.skip("unsafe member name", f"{raw.get('__url__', '?')}:{key}")
        return False
    return True


def cache_latents(
    cfg: DictConfig,
    out_dir: str | Path | None = None,
    dtype: str = "float32",
    batch_size: int | None = None,
    device: str | None = None,
    part: tuple[int, int] = (0, 1),
) -> dict[str, Any]:
    """Cache cfg.data's training shards for cfg.stage (a stage=unet config); returns what
    cache.json holds, including "train_urls", the pattern to train from."""
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype} is not valid; choose one of: {', '.join(DTYPES)}")
    if cfg.stage.name != "unet":
        raise UserError("cache_latents reads stage=unet's config (stage.vae, stage.text_encoder)")
    check_values(cfg)  # the config's types and ranges, as a training run checks them
    out_dir = Path(out_dir or Path(cfg.paths.output_root) / cfg.experiment_name / "latents")
    datamodule = WebDataModule.from_config(cfg.data)
    loader = datamodule.loader
    if loader.crop == "random":
        raise UserError(
            "data.crop=random cannot be cached (every step would need a new crop of the image); "
            "cache with data.crop=center"
        )
    torch_device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    vae, text_encoder = frozen_parts(cfg, torch_device)
    datamodule.prepare_data()  # makes the embedded dataset if it is missing
    urls = datamodule.train_urls
    check_shards_exist(urls, "data.train_urls")
    claim_folder(out_dir, "latent cache", "--out", known=(INFO_FILE,))
    encode = (vae, text_encoder, batch_size or loader.batch_size, DTYPES[dtype], torch_device)
    counts, totals = cache_shards(urls, out_dir, part, loader, encode)
    info = {
        "train_urls": shard_urls(out_dir, "train", len(urls)),
        "source_urls": urls,
        "vae": cfg.stage.vae,
        "text_encoder": cfg.stage.text_encoder,
        "text_layer": cfg.stage.text_layer if text_encoder is not None else None,
        "image_size": loader.image_size,
        "flips": loader.random_flip,
        "dtype": dtype,
        "latent_moments": moments_shape(vae, loader.image_size),
        "buckets": loader.bucket_list,  # [width, height]: each sample's latent at its bucket's
        **counts,
        "samples_written": totals.ok,
        "skipped": dict(totals.skipped),
    }
    write_json(out_dir / INFO_FILE, info)
    return info


def cache_shards(
    urls: list[str], out_dir: Path, part: tuple[int, int], loader: Any, encode: tuple
) -> tuple[dict[str, int], StreamStats]:
    """Every parts-th shard from the index-th (part = (index, parts)), each unless already there."""
    index, parts = part
    counts, totals = {"shards_written": 0, "shards_kept": 0}, StreamStats()
    mine = [(number, url) for number, url in enumerate(urls) if number % parts == index]
    with progress.bar(len(mine), "caching", "shard"):
        for number, url in progress.tick(mine):
            out_file = shard_path(out_dir, "train", number)
            if out_file.is_file():
                counts["shards_kept"] += 1
                continue
            stats = cache_shard(url, out_file, loader, *encode)
            totals.ok += stats.ok
            totals.skipped.update(stats.skipped)
            counts["shards_written"] += 1
            log.info("cached %s -> %s (%d samples)", url, out_file, stats.ok)
    return counts, totals


def frozen_parts(cfg: DictConfig, device: torch.device) -> tuple[Any, Any]:
    """The stage's VAE and text encoder (None without one), built as the stage builds them."""
    from ldm_train.train import build  # keeps UserErrors of the upstream loaders one line

    vae = build(cfg.stage.module.latents.vae)
    if vae is None:
        raise UserError("stage.vae=null (pixel space): there are no latents to cache")
    text_encoder = build(cfg.stage.module.conditioning.text_encoder)
    vae.to(device)
    if text_encoder is not None:
        text_encoder.to(device)
    return vae, text_encoder


def moments_shape(vae, image_size: int) -> list[int]:
    """2C x h x w: what latent.npy holds for this VAE and image size."""
    side = image_size // vae_scale_factor(vae)
    return [2 * vae.config.latent_channels, side, side]


def parse_part(text: str) -> tuple[int, int]:
    try:
        index, parts = (int(x) for x in text.split("/"))
    except ValueError:
        raise UserError(f"--part {text}: write K/N, e.g. 0/4") from None
    if not 0 <= index < parts:
        raise UserError(f"--part {text}: need 0 <= K < N")
    return index, parts


def main(argv: Sequence[str] | None = None) -> int:
    parser = Parser(
        "python -m ldm_train.cache_latents",
        "Encode the training shards with the frozen VAE and text encoder of stage=unet.",
    )
    parser.add_argument("overrides", nargs="*", help="config overrides, as for python -m ldm_train")
    parser.add_argument("--out", help="output folder (default: outputs/<experiment>/latents)")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES))
    parser.add_argument(
        "--batch-size", type=typed(cli.BATCH), help="images per encoder call (data.batch_size)"
    )
    parser.add_argument("--device", help="cpu | cuda | cuda:N (default: cuda if available)")
    parser.add_argument("--part", default="0/1", help="K/N: cache every N-th shard from the K-th")
    args = parser.parse_intermixed_args(argv)

    def run() -> int:
        part = parse_part(args.part)
        check_overrides(["stage=unet", *args.overrides])  # unknown keys: one line, closest named
        cfg = compose_config(["stage=unet", *args.overrides])
        device = cli.device(args.device)
        with progress.shown():
            info = cache_latents(cfg, args.out, args.dtype, args.batch_size, device, part)
        print(
            f"cached {info['samples_written']} samples into {info['shards_written']} shards "
            f"({info['shards_kept']} already there); train from them with:\n"
            f"  python -m ldm_train stage=unet \"data.train_urls='{info['train_urls']}'\""
        )
        return 0

    return cli.run("ldm_train.cache_latents", run)


if __name__ == "__main__":
    sys.exit(main())
