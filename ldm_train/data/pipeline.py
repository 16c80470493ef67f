"""The WebDataset pipeline every stage reads: shards -> samples -> decoded, transformed batches.

Training streams never end (shards are reshuffled and reread, and `with_epoch` cuts a fixed number of
batches per epoch, so every DDP rank runs the same number of steps); validation is one finite,
deterministic pass. A batch is {"image": B x 3 x H x W float in [-1, 1], "caption": [str], "key": [str],
"meta": [dict] (the sample's json, {} if none), "skipped": int}. Bad data is skipped and counted, never a crash: each batch carries in
`batch["skipped"]` how many samples its worker dropped since the previous batch.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import random
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info
from torchvision.transforms import v2

log = logging.getLogger(__name__)

MAX_WARNINGS_PER_REASON = 5
# A reader that has decoded nothing after this many samples is reading a broken configuration.
NO_VALID_SAMPLE_LIMIT = 1000


class NoValidSamplesError(RuntimeError):
    """A whole pass over the shards gave no usable sample."""


@dataclass
class LoaderConfig:
    """The loader's options (the `data.*` keys other than urls, name and the dataset maker)."""

    image_size: int = 256
    batch_size: int = 32
    val_batch_size: int | None = None
    num_workers: int = 2
    shuffle_buffer: int = 1000
    seed: int = 0
    image_keys: Sequence[str] = ("jpg", "jpeg", "png", "webp")
    caption_keys: Sequence[str] = ("txt", "caption", "text")
    random_flip: bool = True
    crop: Literal["center", "random"] = "center"
    batches_per_epoch: int = 1000


@dataclass
class StreamStats:
    """Per-worker counts of what went through and what was skipped, and why."""

    read: int = 0  # samples read from the tars (before the split, shuffle and decoding)
    ok: int = 0  # samples decoded into a usable image and caption
    skipped: Counter = field(default_factory=Counter)
    _reported: int = 0

    def skip(self, reason: str, where: str, error: BaseException | None = None) -> None:
        self.skipped[reason] += 1
        if self.skipped[reason] <= MAX_WARNINGS_PER_REASON:
            detail = f": {type(error).__name__}: {error}" if error is not None else ""
            more = (
                " (further ones counted, not shown)"
                if self.skipped[reason] == MAX_WARNINGS_PER_REASON
                else ""
            )
            log.warning("skipped (%s) %s%s%s", reason, where, detail, more)

    def shard_error(self, error: BaseException) -> bool:
        """webdataset handler for unreadable or corrupt shards: count, warn, go on."""
        self.skip("unreadable shard", "a shard", error)  # webdataset puts the url into the error
        return True

    def take_new_skips(self) -> int:
        total = sum(self.skipped.values())
        new, self._reported = total - self._reported, total
        return new


def worker_slot(rank: int, world_size: int) -> tuple[int, int]:
    """This process's place among all readers: (index, count) over ranks x dataloader workers."""
    info = get_worker_info()
    worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
    return rank * workers + worker, world_size * workers


class ShardStream(IterableDataset):
    """Shard URLs for this rank and worker: the pipeline's explicit node and worker splitter.

    With at least one shard per reader, readers take disjoint shards. With fewer, every reader opens
    every shard and `split_samples` keeps a disjoint share of the samples, so no reader sits idle.
    Training passes repeat forever, each in a new seeded order; a pass that reads no sample at all
    (every shard missing or corrupt) is an error, not an endless loop.
    """

    def __init__(
        self,
        urls: Sequence[str],
        rank: int,
        world_size: int,
        seed: int,
        train: bool,
        stats: StreamStats,
    ):
        self.urls, self.rank, self.world_size = list(urls), rank, world_size
        self.seed, self.train, self.stats = seed, train, stats

    def __iter__(self) -> Iterator[dict[str, str]]:
        slot, slots = worker_slot(self.rank, self.world_size)
        for epoch in itertools.count() if self.train else [0]:
            order = list(self.urls)
            if self.train:
                random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            mine = order[slot::slots] if len(order) >= slots else order
            read_before = self.stats.read
            for url in mine:
                yield {"url": url}
            # Pull-based: every sample of this pass has been read from its tar by now.
            if self.stats.read == read_before:
                raise no_valid_samples(self.urls, self.train, self.stats)


def no_valid_samples(urls: Sequence[str], train: bool, stats: StreamStats) -> NoValidSamplesError:
    option = "data.train_urls" if train else "data.val_urls"
    return NoValidSamplesError(
        f"no valid sample in {list(urls)}; skipped: {dict(stats.skipped) or 'nothing'}; "
        f"check {option}, data.image_keys and data.caption_keys"
    )


def count_read(samples: Iterator[dict], stats: StreamStats) -> Iterator[dict]:
    for sample in samples:
        stats.read += 1
        yield sample


def split_samples(
    samples: Iterator[dict], rank: int, world_size: int, enabled: bool
) -> Iterator[dict]:
    """Keep every n-th sample for this reader when readers share shards (see ShardStream)."""
    if not enabled:
        yield from samples
        return
    slot, slots = worker_slot(rank, world_size)
    for index, sample in enumerate(samples):
        if index % slots == slot:
            yield sample


def seeded_shuffle(
    samples: Iterator[dict], bufsize: int, seed: int, rank: int, world_size: int
) -> Iterator[dict]:
    """wds.shuffle with a seed of its own per reader (one seed for all would shuffle alike)."""
    slot, _ = worker_slot(rank, world_size)
    rng = random.Random(seed * 7919 + slot)
    yield from wds.filters._shuffle(samples, bufsize=bufsize, initial=min(bufsize, 100), rng=rng)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB; transparency is composited on white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # PIL's convert("RGB") clips high-bit-depth greys instead of scaling them.
        array = np.asarray(image, dtype=np.float64)
        peak = float(array.max()) if array.size else 0.0
        # The bit depth the values fit, not their own maximum (a dark image must stay dark).
        top = next((t for t in (255.0, 65535.0) if peak <= t), peak)
        if image.mode.startswith("I;16"):
            top = 65535.0
        image = Image.fromarray(np.clip(array / top * 255.0, 0, 255).astype(np.uint8), "L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("RGB")


def image_transform(cfg: LoaderConfig, train: bool) -> v2.Compose:
    """Shorter side to image_size (small images are upscaled), crop, flip, scale to [-1, 1]."""
    crop = v2.RandomCrop if (train and cfg.crop == "random") else v2.CenterCrop
    steps: list[Any] = [v2.Resize(cfg.image_size, antialias=True), crop(cfg.image_size)]
    if train and cfg.random_flip:
        steps.append(v2.RandomHorizontalFlip())
    steps += [
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize([0.5] * 3, [0.5] * 3),
    ]
    return v2.Compose(steps)


def read_meta(sample: dict) -> dict:
    """The sample's json as a dict; {} when absent or unreadable (metadata is optional)."""
    try:
        meta = json.loads(sample["json"]) if "json" in sample else {}
    except ValueError:
        return {}
    return meta if isinstance(meta, dict) else {}


def read_caption(sample: dict, caption_keys: Sequence[str], meta: dict) -> str | None:
    """The first caption key present (bytes -> UTF-8), else the json's "caption"; None if neither."""
    for key in caption_keys:
        if key in sample:
            return sample[key].decode("utf-8").strip()
    caption = meta.get("caption")
    return caption.strip() if isinstance(caption, str) else None


def decode_samples(
    samples: Iterator[dict],
    cfg: LoaderConfig,
    train: bool,
    stats: StreamStats,
    urls: Sequence[str] = (),
) -> Iterator[dict]:
    """Raw tar members -> {"image", "caption", "key"}; undecodable or incomplete samples are skipped.

    Decoding by hand rather than with wds.decode: we need one image out of several candidate keys,
    every PIL mode made RGB, and a count per reason for what is skipped.
    """
    transform = image_transform(cfg, train)
    attempts = 0
    for sample in samples:
        attempts += 1
        if stats.ok == 0 and attempts > NO_VALID_SAMPLE_LIMIT:
            raise no_valid_samples(urls, train, stats)  # an endless training stream of bad samples
        where = f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"
        image_key = next((k for k in cfg.image_keys if k in sample), None)
        if image_key is None:
            stats.skip("missing image", where)
            continue
        meta = read_meta(sample)
        try:
            caption = read_caption(sample, cfg.caption_keys, meta)
        except UnicodeDecodeError as error:
            stats.skip("caption not UTF-8", where, error)
            continue
        if caption is None:
            stats.skip("missing caption", where)
            continue
        if not caption:
            stats.skip("empty caption", where)
            continue
        try:
            with Image.open(io.BytesIO(sample[image_key])) as raw:
                raw.draft("RGB", (cfg.image_size, cfg.image_size))  # JPEG: decode at reduced size
                image = transform(to_rgb(raw))
        except Exception as error:  # PIL raises many types (incl. DecompressionBombError)
            stats.skip("undecodable image", where, error)
            continue
        stats.ok += 1
        yield {"image": image, "caption": caption, "key": sample.get("__key__", ""), "meta": meta}
    if attempts and stats.ok == 0:
        raise no_valid_samples(urls, train, stats)


def collate(samples: list[dict]) -> dict[str, Any]:
    return {
        "image": torch.stack([s["image"] for s in samples]),
        "caption": [s["caption"] for s in samples],
        "key": [s["key"] for s in samples],
        "meta": [s["meta"] for s in samples],
    }


def attach_skip_count(batches: Iterator[dict], stats: StreamStats) -> Iterator[dict]:
    for batch in batches:
        batch["skipped"] = stats.take_new_skips()
        yield batch


def build_pipeline(
    urls: Sequence[str], cfg: LoaderConfig, *, train: bool, rank: int = 0, world_size: int = 1
) -> wds.DataPipeline:
    """The dataset a DataLoader(batch_size=None) iterates: batches are made inside the workers."""
    stats = StreamStats()
    readers = world_size * max(1, cfg.num_workers)
    batch_size = cfg.batch_size if train else (cfg.val_batch_size or cfg.batch_size)
    stages: list[Any] = [
        ShardStream(urls, rank, world_size, cfg.seed, train, stats),
        wds.tarfile_to_samples(handler=stats.shard_error),
        wds.pipelinefilter(count_read)(stats),
        wds.pipelinefilter(split_samples)(rank, world_size, len(urls) < readers),
    ]
    if train and cfg.shuffle_buffer > 1:
        stages.append(
            wds.pipelinefilter(seeded_shuffle)(cfg.shuffle_buffer, cfg.seed, rank, world_size)
        )
    stages += [
        wds.pipelinefilter(decode_samples)(cfg, train, stats, list(urls)),
        wds.batched(batch_size, collation_fn=collate, partial=not train),
        wds.pipelinefilter(attach_skip_count)(stats),
    ]
    pipeline = wds.DataPipeline(*stages)
    return EpochSlices(pipeline, cfg.batches_per_epoch) if train else pipeline


class EpochSlices(IterableDataset):
    """Cuts one endless stream into epochs of `batches` batches per rank.

    Not wds's with_epoch: that starts the stream afresh at every epoch, so each epoch would replay
    the first one. Here the stream lives on between epochs (in persistent DataLoader workers, or in
    this object without workers), and the rank's batches are split exactly over its workers.
    """

    def __init__(self, pipeline: wds.DataPipeline, batches: int):
        self.pipeline, self.batches = pipeline, batches
        self._stream: Iterator[dict] | None = None

    def __iter__(self) -> Iterator[dict]:
        if self._stream is None:
            self._stream = iter(self.pipeline)
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        mine = self.batches // workers + (worker < self.batches % workers)
        for _ in range(mine):
            yield next(self._stream)
