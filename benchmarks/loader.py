"""Loader throughput: images/s of our training stream (WebDataModule: seeded shuffle, per-sample
augmentation RNG, skip accounting, checkpointable position, StatefulDataLoader) against a plain
loop of tarfile + PIL decoding the same shards with the same transform, at the same DataLoader
worker count (target >= 0.9); and how both scale with workers (0, 1, 2). With 0 workers the ratio
of CPU time is printed too: on a shared machine it is the steadier figure."""

from __future__ import annotations

import io
import itertools
import json
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from benchmarks.common import Clock, Rates, alternate, best, make_data, setup_process, train_urls
from ldm_train.data.datamodule import WebDataModule, expand_urls
from ldm_train.data.stream import LoaderConfig, image_transform

BATCH = 64
PASSES = 2  # timed: two passes over the data, less the first batch (worker start-up, first shard)
RUNS = 3  # each side, alternated; the best run counts
WORKERS = (0, 1, 2)
SIZES = {32: 2048, 128: 1024}  # image side: training images (8 shards)


class PlainTarImages(IterableDataset):
    """The baseline: each worker opens its share of the shards with tarfile, pairs the members of
    a sample by name, decodes the image with PIL (and the json, as ours); no shuffle, no error
    handling, no resumable position."""

    def __init__(self, urls: list[str], cfg: LoaderConfig):
        self.urls, self.transform = urls, image_transform(cfg, train=False)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, str]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for url in itertools.cycle(self.urls[worker::workers]):
            with tarfile.open(url) as tar:
                sample: dict[str, bytes] = {}
                for member in tar:
                    key, _, ext = member.name.partition(".")
                    if sample and key != sample["__key__"]:
                        yield self.decode(sample)
                        sample = {}
                    sample["__key__"] = key
                    sample[ext] = tar.extractfile(member).read()
                if sample:
                    yield self.decode(sample)

    def decode(self, sample: dict) -> tuple[torch.Tensor, str, dict]:
        # The same members as ours: image, caption and the json metadata a batch carries.
        meta = json.loads(sample["json"]) if "json" in sample else {}
        with Image.open(io.BytesIO(sample["png"])) as image:
            return self.transform(image.convert("RGB")), sample["txt"].decode(), meta


def timed_batches(image_size: int) -> int:
    """Whole passes: a shuffle buffer reads ahead (two samples per sample while it fills up) and
    drains at the end of a pass, so a window inside a pass would charge it too much or too little."""
    return PASSES * SIZES[image_size] // BATCH - 1


def images_per_second(batches: Iterator, image_size: int) -> Rates:
    """Images per second of wall time, and per CPU second of this process (with 0 workers all
    the loading happens here, so the CPU rate is the one other processes' load does not blur)."""
    next(batches)
    clock = Clock()
    images = sum(
        len(batch["caption"] if isinstance(batch, dict) else batch[1])
        for batch in itertools.islice(batches, timed_batches(image_size))
    )
    return clock.rates(images)


def loader_config(workers: int, image_size: int) -> LoaderConfig:
    return LoaderConfig(
        image_size=image_size,
        batch_size=BATCH,
        num_workers=workers,
        shuffle_buffer=500,
        random_flip=False,
        batches_per_epoch=timed_batches(image_size) + 1,
    )


def ours(urls: str, workers: int, image_size: int) -> Rates:
    datamodule = WebDataModule(urls, None, loader_config(workers, image_size))
    return images_per_second(iter(datamodule.train_dataloader()), image_size)


def keep_meta(samples: list[tuple]) -> tuple:
    images, captions, metas = zip(*samples, strict=True)
    return torch.stack(images), list(captions), list(metas)


def plain(urls: str, workers: int, image_size: int) -> Rates:
    dataset = PlainTarImages(expand_urls(urls), loader_config(workers, image_size))
    loader = DataLoader(dataset, batch_size=BATCH, num_workers=workers, collate_fn=keep_meta)
    return images_per_second(iter(loader), image_size)


def main() -> None:
    setup_process()
    with tempfile.TemporaryDirectory() as tmp:
        for image_size, n_train in SIZES.items():
            root = make_data(Path(tmp) / f"shapes-{image_size}", n_train, image_size)
            urls = train_urls(root)
            rates = {}
            for workers in WORKERS:
                our_runs, plain_runs = alternate(
                    RUNS,
                    lambda: ours(urls, workers, image_size),  # noqa: B023 (called here)
                    lambda: plain(urls, workers, image_size),  # noqa: B023
                )
                rates[workers] = best(r.wall for r in our_runs), best(r.wall for r in plain_runs)
                line = (
                    f"loader {image_size}px, {workers} workers: {rates[workers][0]:7.0f} img/s vs "
                    f"{rates[workers][1]:7.0f} img/s tarfile+PIL loop = "
                    f"{rates[workers][0] / rates[workers][1]:.2f}x"
                )
                if workers == 0:
                    cpu = best(r.cpu for r in our_runs), best(r.cpu for r in plain_runs)
                    line += (
                        f"; per CPU second: {cpu[0]:.0f} vs {cpu[1]:.0f} = {cpu[0] / cpu[1]:.2f}x"
                    )
                print(line, flush=True)
            for workers in WORKERS[1:]:
                print(
                    f"loader {image_size}px scaling, {workers} vs 0 workers: ours "
                    f"{rates[workers][0] / rates[0][0]:.2f}x, tarfile+PIL loop "
                    f"{rates[workers][1] / rates[0][1]:.2f}x",
                    flush=True,
                )


if __name__ == "__main__":
    main()
