"""Loader throughput: images/s of the training stream with 2 DataLoader workers against 0 (the
baseline, decoding in the training process), on the embedded dataset."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from ldm_train.data.datamodule import WebDataModule
from ldm_train.data.pipeline import LoaderConfig
from ldm_train.data.shapes import make_shapes_dataset

BATCHES = 60


def images_per_second(root: Path, workers: int, image_size: int) -> float:
    loader = LoaderConfig(
        image_size=image_size,
        batch_size=64,
        num_workers=workers,
        shuffle_buffer=500,
        batches_per_epoch=BATCHES,
    )
    datamodule = WebDataModule(f"{root}/train-{{000000..000007}}.tar", None, loader)
    iterator = iter(datamodule.train_dataloader())
    next(iterator)  # start-up (worker processes, first shard) is not throughput
    start = time.perf_counter()
    images = sum(batch["image"].shape[0] for batch in iterator)
    return images / (time.perf_counter() - start)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for image_size in (32, 64):
            root = Path(tmp) / f"shapes-{image_size}"
            make_shapes_dataset(
                root,
                image_size=image_size,
                n_train=8192,
                n_val=64,
                train_shards=8,
                val_shards=1,
                progress=False,
            )
            baseline = images_per_second(root, 0, image_size)
            two = images_per_second(root, 2, image_size)
            print(
                f"loader {image_size}px: {baseline:7.0f} img/s with 0 workers (baseline); "
                f"2 workers: {two:7.0f} img/s = {two / baseline:.2f}x"
            )


if __name__ == "__main__":
    main()
