"""Loader throughput with aspect-ratio buckets: images/s of our training stream over shards of
non-square images (the shapes maker's 1:1, 3:2 and 2:3 canvases, as data=shapes_mixed) with one
bucket per canvas, against the same stream and images without buckets (each image cropped to the
square), at the same worker count (target >= 0.9). Buckets add the grouping (a batch waits for its
bucket to fill) and keep the images' whole area (a 3:2 image is 1.5x the square's pixels).

Besides wall time, images per CPU second of every loader process (this one and its workers, read
from /proc on Linux): on a shared machine the steadier figure."""

from __future__ import annotations

import itertools
import multiprocessing
import os
import tempfile
import time
from pathlib import Path

from benchmarks.common import TRAIN_SHARDS, Rates, alternate, best, make_data, setup_process
from ldm_train.data.datamodule import WebDataModule
from ldm_train.data.shards import shard_urls
from ldm_train.data.stream import LoaderConfig

BATCH = 64
RUNS = 3  # each side, alternated; the best run counts
WORKERS = (0, 2)
SIZES = {32: 2048, 128: 1024}  # the square side: training images (8 shards)
SHARDS = TRAIN_SHARDS  # make_data's


def canvases(side: int) -> list[list[int]]:
    return [[side, side], [side * 3 // 2, side], [side, side * 3 // 2]]


def make_mixed(root: Path, side: int, n_train: int) -> str:
    make_data(root, n_train, side, canvases=canvases(side))
    return shard_urls(root, "train", SHARDS)


def loader_cpu() -> float:
    """CPU seconds of this process and its live children (the loader workers)."""
    total = time.process_time()
    for child in multiprocessing.active_children():
        try:  # /proc/<pid>/stat: utime and stime are fields 14 and 15, in clock ticks
            fields = Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except OSError:
            pass
    return total


def rate(urls: str, side: int, n_train: int, workers: int, bucketed: bool) -> Rates:
    """Images per second over two passes, less the first batch (worker start-up)."""
    timed = 2 * n_train // BATCH - 1
    cfg = LoaderConfig(
        image_size=side,
        batch_size=BATCH,
        num_workers=workers,
        shuffle_buffer=500,
        random_flip=False,
        batches_per_epoch=timed + 1,
        buckets=canvases(side) if bucketed else None,
    )
    batches = iter(WebDataModule(urls, None, cfg).train_dataloader())
    next(batches)
    wall, cpu = time.perf_counter(), loader_cpu()
    images = sum(len(batch["caption"]) for batch in itertools.islice(batches, timed))
    return Rates(images / (loader_cpu() - cpu), images / (time.perf_counter() - wall))


def main() -> None:
    setup_process()
    with tempfile.TemporaryDirectory() as tmp:
        for side, n_train in SIZES.items():
            urls = make_mixed(Path(tmp) / f"mixed-{side}", side, n_train)
            for workers in WORKERS:
                with_buckets, without = alternate(
                    RUNS,
                    lambda: rate(urls, side, n_train, workers, True),  # noqa: B023 (called here)
                    lambda: rate(urls, side, n_train, workers, False),  # noqa: B023
                )
                ours, square = best(r.wall for r in with_buckets), best(r.wall for r in without)
                cpu = best(r.cpu for r in with_buckets), best(r.cpu for r in without)
                print(
                    f"loader {side}px mixed shapes, {workers} workers: buckets {ours:7.0f} img/s "
                    f"vs square crops {square:7.0f} img/s = {ours / square:.2f}x; per CPU second "
                    f"of the loader's processes: {cpu[0]:.0f} vs {cpu[1]:.0f} = "
                    f"{cpu[0] / cpu[1]:.2f}x",
                    flush=True,
                )


if __name__ == "__main__":
    main()
