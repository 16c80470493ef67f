"""The WebDataset pipeline every stage reads: shards -> samples -> decoded, transformed batches.

A batch is {"image": B x 3 x H x W float in [-1, 1], "caption": [str], "key": [str], "meta": [dict]
(the sample's json, {} if none), "skipped": int}. Bad data is skipped and counted, never a crash:
`batch["skipped"]` says how many samples its reader dropped since its previous batch.

Training: every reader (a DDP rank x DataLoader worker) reads an endless stream made of passes over
the shards. Each pass reshuffles the shard order and the samples (a shuffle buffer that starts
afresh each pass), all seeded, so the stream is a pure function of the seed and the reader's place.
It is cut into epochs of `batches_per_epoch` batches per rank, so every rank runs the same number
of steps. Its position (pass, samples taken in the pass, batches in the epoch) is checkpointable:
a resumed run replays the current pass's raw samples without decoding them and goes on with
exactly the batches the uninterrupted run would have seen. Validation is one finite,
deterministic pass. With aspect-ratio buckets a batch holds images of one shape
(ldm_train/data/bucket_sizes.py: sizes and crops; bucket_batches.py: batching, and the held samples' place
in the stream, which is part of the position).

Decoding one sample, its options and skip counts: ldm_train/data/samples.py.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from ldm_train.data.bucket_batches import BucketBatcher, decode_positions, grouped_batches
from ldm_train.data.bucket_sizes import BucketTransform
from ldm_train.data.samples import (  # noqa: F401  (names importers take from here)
    LATENT_FLIP_KEY,
    LATENT_KEY,
    TEXT_KEY,
    CacheError,
    ImageTransform,
    LoaderConfig,
    LoaderUserError,
    NoValidSamplesError,
    StreamStats,
    collate,
    decode_sample,
    image_transform,
    to_rgb,
)

Transform = ImageTransform | BucketTransform
# A reader that has decoded nothing after this many samples is reading a broken configuration.
NO_VALID_SAMPLE_LIMIT = 1000


def worker_slot(rank: int, world_size: int) -> tuple[int, int]:
    """This process's place among all readers: (index, count) over ranks x dataloader workers."""
    info = get_worker_info()
    worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
    return rank * workers + worker, world_size * workers


def no_valid_samples(
    urls: Sequence[str], train: bool, stats: StreamStats, option: str | None = None
) -> NoValidSamplesError:
    option = option or ("data.train_urls" if train else "data.val_urls")
    return NoValidSamplesError(
        f"no valid sample in {list(urls)}; skipped: {dict(stats.skipped) or 'nothing'}; "
        f"check {option}, data.image_keys and data.caption_keys"
    )


def read_pass(
    urls: Sequence[str],
    slot: int,
    slots: int,
    stats: StreamStats,
    order_seed: str | None = None,
    shuffle_buffer: int = 0,
    option: str | None = None,
) -> Iterator[dict]:
    """Raw samples of one pass for reader `slot` of `slots` (the explicit node and worker split).

    With at least one shard per reader, readers take disjoint shards; with fewer, every reader opens
    every shard and keeps every `slots`-th sample, so no reader sits idle. order_seed shuffles the
    shard order and seeds the sample shuffle buffer (None: file order, no shuffle). option: the
    config key the urls came from, named when no sample could be read (default: by order_seed,
    data.train_urls or data.val_urls).
    """
    order = list(urls)
    if order_seed is not None:
        random.Random(f"{order_seed}-shards").shuffle(order)
    by_sample = len(order) < slots
    mine = order if by_sample else order[slot::slots]
    samples = wds.tariterators.tarfile_samples(
        ({"url": url} for url in mine), handler=stats.shard_error
    )
    read_before = stats.read
    kept = count_and_split(samples, stats, slot, slots, by_sample)
    if order_seed is not None and shuffle_buffer > 1:
        rng = random.Random(f"{order_seed}-samples-{slot}")
        kept = wds.filters._shuffle(kept, shuffle_buffer, min(shuffle_buffer, 100), rng=rng)
    yield from kept
    # Pull-based: every sample of the pass has been read from its tar by now.
    if stats.read == read_before and not stats.replaying:
        raise no_valid_samples(urls, order_seed is not None, stats, option)


def count_and_split(
    samples: Iterator[dict], stats: StreamStats, slot: int, slots: int, by_sample: bool
) -> Iterator[dict]:
    for index, sample in enumerate(samples):
        stats.read += 1
        if not by_sample or index % slots == slot:
            yield sample


@dataclass
class StreamPosition:
    """Where a training reader is in its endless stream."""

    pass_index: int = 0  # which pass over the shards
    taken_in_pass: int = 0  # raw samples of this pass taken for decoding (used or skipped)
    epoch_batches: int = 0  # batches yielded in the current epoch


class TrainStream(IterableDataset):
    """One reader's endless, seeded stream of training batches, cut into epochs.

    Not wds's with_epoch: that starts the stream afresh at every epoch, so each epoch would replay
    the first one. Here the stream lives on between epochs (in persistent DataLoader workers, or in
    this object without workers), the rank's batches are split exactly over its workers, and
    state_dict/load_state_dict (called in each worker by torchdata's StatefulDataLoader) carry the
    position across a resume.
    """

    def __init__(self, urls: Sequence[str], cfg: LoaderConfig, rank: int = 0, world_size: int = 1):
        self.urls, self.cfg, self.rank, self.world_size = list(urls), cfg, rank, world_size
        self.stats = StreamStats()
        self.position = StreamPosition()
        self._batches: Iterator[dict] | None = None
        self._restored = False
        # Aspect-ratio buckets (ldm_train/data/bucket_batches.py): samples held until their bucket
        # fills; _held_state: a checkpoint's held samples, decoded again at the next iter().
        self.batcher = BucketBatcher(cfg.batch_size, cfg.bucket_cap) if cfg.bucketed else None
        self._held_state: dict | None = None

    def state_dict(self) -> dict[str, Any]:
        state = {"position": asdict(self.position), "stats": self.stats.state_dict()}
        if self.batcher is not None:
            state["buckets"] = self.batcher.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = StreamPosition(**state["position"])
        self.stats.load_state_dict(state["stats"])
        self._held_state = state.get("buckets")
        self._batches = None  # rebuilt from the position on the next iter()
        self._restored = True

    def __iter__(self) -> Iterator[dict]:
        # Not a generator: the epoch starts when iter() is called, not at its first batch. A
        # persistent worker reports its state right after iter() at each epoch's start; a
        # generator would still report the previous epoch as finished there, and a checkpoint
        # taken before this worker's first batch of the new epoch (with 2 workers: one step into
        # the epoch) would resume it as finished, losing its batches of that epoch.
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        per_epoch = self.cfg.batches_per_epoch
        mine = per_epoch // workers + (worker < per_epoch % workers)
        if self._batches is None:
            self._batches = self._batch_stream()
        restored, self._restored = self._restored, False
        if self.position.epoch_batches >= mine:
            if restored:
                return iter(())  # saved at the end of an epoch: its remainder is empty
            self.position.epoch_batches = 0  # the previous epoch is done: a new one
        return self._epoch(mine)

    def _epoch(self, mine: int) -> Iterator[dict]:
        while self.position.epoch_batches < mine:
            batch = next(self._batches)
            self.position.epoch_batches += 1  # before the yield: the worker's state includes it
            yield batch

    def _order_seed(self, pass_index: int) -> str:
        return f"{self.cfg.seed}-{self.rank}-pass{pass_index}"

    def _read(self, pass_index: int) -> Iterator[dict]:
        slot, slots = worker_slot(self.rank, self.world_size)
        order_seed = self._order_seed(pass_index)
        return read_pass(self.urls, slot, slots, self.stats, order_seed, self.cfg.shuffle_buffer)

    def _decode(
        self, sample: dict, pass_index: int, index: int, transform: Transform
    ) -> dict | None:
        # Augmentation drawn from the sample's place in the stream, not a global RNG (made only
        # when there is augmentation to draw: seeding costs as much as a json).
        rng = None
        cfg = self.cfg
        if cfg.random_flip or cfg.crop == "random" or cfg.shuffle_tags is not None:
            slot, _ = worker_slot(self.rank, self.world_size)
            rng = random.Random(f"{self._order_seed(pass_index)}-{slot}-{index}")
        return decode_sample(sample, self.cfg, transform, self.stats, rng)

    def _samples(self, transform: Transform) -> Iterator[tuple[tuple[int, int], dict]]:
        """(position, decoded sample) from the stream's current position on."""
        position, attempts = self.position, 0
        for pass_index in itertools.count(position.pass_index):
            if pass_index != position.pass_index:
                position.pass_index, position.taken_in_pass = pass_index, 0
            raw = self._read(pass_index)
            if position.taken_in_pass:  # resuming: skip what was taken, without decoding it
                self.stats.replaying = True
                for _ in itertools.islice(raw, position.taken_in_pass):
                    pass
                self.stats.replaying = False
            for sample in raw:
                position.taken_in_pass += 1
                attempts += 1
                decoded = self._decode(sample, pass_index, position.taken_in_pass, transform)
                if decoded is not None:
                    yield (pass_index, position.taken_in_pass), decoded
                elif self.stats.ok == 0 and attempts > NO_VALID_SAMPLE_LIMIT:
                    raise no_valid_samples(self.urls, True, self.stats)

    def _batch_stream(self) -> Iterator[dict]:
        transform = image_transform(self.cfg, train=True)
        if self.batcher is not None:
            yield from self._bucket_stream(transform)
            return
        batch: list[dict] = []
        for _, sample in self._samples(transform):
            batch.append(sample)
            if len(batch) == self.cfg.batch_size:
                yield collate(batch, self.stats)
                batch = []

    def _bucket_stream(self, transform: Transform) -> Iterator[dict]:
        if self._held_state is not None:  # resuming: decode the held samples again
            ok, self.stats.replaying = self.stats.ok, True
            held = decode_positions(
                BucketBatcher.positions(self._held_state),
                self._read,
                lambda raw, pass_index, index: self._decode(raw, pass_index, index, transform),
            )
            self.stats.ok, self.stats.replaying = ok, False
            self.batcher.load_state_dict(self._held_state, held)
            self._held_state = None
        for position, sample in self._samples(transform):
            for batch in self.batcher.add(sample, position):
                yield {**collate(batch, self.stats), **self.batcher.report()}


class ValStream(IterableDataset):
    """One finite, deterministic pass over the validation shards (this reader's share)."""

    def __init__(self, urls: Sequence[str], cfg: LoaderConfig, rank: int = 0, world_size: int = 1):
        self.urls, self.cfg, self.rank, self.world_size = list(urls), cfg, rank, world_size
        self.stats = StreamStats()

    def __iter__(self) -> Iterator[dict]:
        slot, slots = worker_slot(self.rank, self.world_size)
        transform = image_transform(self.cfg, train=False)
        batch_size = self.cfg.val_batch_size or self.cfg.batch_size
        attempts = 0

        def decoded() -> Iterator[dict]:
            nonlocal attempts
            for sample in read_pass(self.urls, slot, slots, self.stats):
                attempts += 1
                if (result := decode_sample(sample, self.cfg, transform, self.stats)) is not None:
                    yield result

        if self.cfg.bucketed:  # one shape per batch (ldm_train/data/bucket_batches.py)
            batches = grouped_batches(decoded(), batch_size, self.cfg.bucket_cap)
        else:
            batches = batched(decoded(), batch_size)
        for batch in batches:
            yield collate(batch, self.stats)
        if attempts and self.stats.ok == 0:
            raise no_valid_samples(self.urls, False, self.stats)


def batched(samples: Iterator[dict], size: int) -> Iterator[list[dict]]:
    """Lists of `size` samples, then the rest (wds.filters.batched without its collation)."""
    while batch := list(itertools.islice(samples, size)):
        yield batch


def check_has_sample(urls: Sequence[str], cfg: LoaderConfig) -> None:
    """NoValidSamplesError unless urls hold at least one usable sample (reads up to the first)."""
    stats = StreamStats(quiet=True)
    transform = image_transform(cfg, train=False)
    for sample in read_pass(urls, 0, 1, stats):  # raises itself if no sample could be read
        if decode_sample(sample, cfg, transform, stats) is not None:
            return
    raise no_valid_samples(urls, False, stats)


def build_pipeline(
    urls: Sequence[str], cfg: LoaderConfig, *, train: bool, rank: int = 0, world_size: int = 1
) -> TrainStream | ValStream:
    """The dataset a DataLoader(batch_size=None) iterates: batches are made inside the workers."""
    stream = TrainStream if train else ValStream
    return stream(urls, cfg, rank, world_size)
