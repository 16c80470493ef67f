"""Aspect-ratio buckets in the loader: the buckets made, which bucket an image goes to and how it is
cropped, batches of one shape, bounded memory with a skewed distribution, exact resume (bitwise
weights after a stop mid-epoch, 0 and 2 workers), and equal steps on every DDP rank."""

from __future__ import annotations

import math
import random
from pathlib import Path

import lightning as L
import pytest
import torch
from PIL import Image
from test_ddp import read_rank_records, write_rank_record
from test_resume import assert_same_parameters, train_recorder

from ldm_train.data.bucket_batches import BucketBatcher, shape_of
from ldm_train.data.bucket_sizes import BucketTransform, make_buckets, nearest_bucket
from ldm_train.data.datamodule import WebDataModule, expand_urls
from ldm_train.data.stream import LoaderConfig, build_pipeline
from ldm_train.errors import UserError
from ldm_train.train import train

MIXED = [[32, 32], [48, 32], [32, 48]]
SHAPES = {(32, 32), (32, 48), (48, 32)}  # (height, width) of those buckets' batches


def loader_cfg(**overrides) -> LoaderConfig:
    options = dict(
        image_size=32,
        batch_size=8,
        num_workers=0,
        shuffle_buffer=16,
        batches_per_epoch=4,
        buckets=MIXED,
    )
    return LoaderConfig(**{**options, **overrides})


# ---------------------------------------------------------------- sizes and assignment


@pytest.mark.parametrize("size,ratio,step", [(32, 2.0, 4), (64, 1.5, 8), (512, 2.0, 64)])
def test_made_buckets_keep_the_area_the_ratio_and_the_step(size, ratio, step):
    buckets = make_buckets(size, ratio, step)
    assert (size, size) in buckets and len(buckets) >= 3
    for width, height in buckets:
        assert width % step == 0 and height % step == 0
        assert width * height <= size * size
        assert max(width, height) / min(width, height) <= ratio
        assert (height, width) in buckets
    assert make_buckets(512, 2.0, 64) == [
        (384, 640),
        (448, 576),
        (512, 512),
        (576, 448),
        (640, 384),
    ]


def test_each_image_goes_to_the_bucket_nearest_its_aspect_ratio():
    buckets = [(32, 48), (32, 32), (48, 32), (64, 32)]
    assert nearest_bucket(1000, 480, buckets) == (64, 32)  # 2.08:1
    assert nearest_bucket(600, 400, buckets) == (48, 32)  # exactly 3:2
    assert nearest_bucket(400, 600, buckets) == (32, 48)
    assert nearest_bucket(1100, 1000, buckets) == (32, 32)
    # Log-ratio distance: 1.75:1 is nearer 2:1 than 1.5:1 (|ln 1.75/2| < |ln 1.75/1.5|).
    assert nearest_bucket(175, 100, buckets) == (64, 32)


def halves(width: int, height: int) -> Image.Image:
    """Red left half, blue right half, a green band (1/25 of the width) in the middle."""
    image = Image.new("RGB", (width, height), (255, 0, 0))
    image.paste((0, 0, 255), (width // 2, 0, width, height))
    image.paste((0, 255, 0), (width // 2 - width // 50, 0, width // 2 + width // 50, height))
    return image


def test_an_image_is_resized_to_cover_its_bucket_and_cropped():
    transform = BucketTransform([(32, 32), (48, 32)], random_crop=False)
    out = transform(halves(200, 100))  # 2:1 -> 48x32: resized to 64x32, centre-cropped to 48
    assert out.shape == (3, 32, 48)
    assert out[0, :, :20].min() > 0.9 and out[2, :, 28:].min() > 0.9  # red left, blue right
    assert out[1, :, 23:25].max() > 0.0  # the green middle stays in the middle
    crops = BucketTransform([(48, 32)], random_crop=True)
    middles = set()
    for seed in range(20):
        cropped = crops(halves(200, 100), random.Random(seed))
        assert cropped.shape == (3, 32, 48)
        middles.add(int(cropped[1].mean(0).argmax()))  # where the green column landed
    assert len(middles) > 3 and min(middles) >= 15 and max(middles) <= 32  # band at 31-32 of 64
    again = [crops(halves(200, 100), random.Random(3)) for _ in range(2)]
    assert torch.equal(*again)  # the crop is the rng's


MADE = ("data.buckets=null", "data.bucket_max_ratio=2.0")


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["data.bucket_max_ratio=2.0"], "both set"),
        (["data.buckets=[[32,32],[32]]"], r"\[width, height\] pairs"),
        (["data.buckets=[[32,32],[64,64]]"], "same aspect ratio"),
        (["data.bucket_cap=4"], "below data.batch_size"),
        ([*MADE, "data.bucket_step=5"], "whole divisor"),
        ([*MADE[:1], "data.bucket_max_ratio=0.5"], "need >= 1"),
    ],
)
def test_bad_bucket_options_are_one_line_errors(mixed_cfg, overrides, message):
    with pytest.raises(UserError, match=message):
        WebDataModule.from_config(mixed_cfg(*overrides).data)


def test_buckets_must_divide_by_the_vaes_factor(mixed_cfg):
    with pytest.raises(UserError, match="bucket 30x32 is not a multiple of 4"):
        train(mixed_cfg("stage=vae", "data.buckets=[[32,32],[30,32]]"))


# ---------------------------------------------------------------- batches of one shape


@pytest.mark.parametrize("workers", [0, 2])
def test_training_batches_are_full_and_of_one_bucket(tiny_mixed_shards, workers):
    cfg = loader_cfg(num_workers=workers, crop="random", random_flip=True)
    module = WebDataModule(tiny_mixed_shards["train_urls"], None, cfg)
    loader = module.train_dataloader()
    seen = set()
    for _ in range(2):
        epoch = list(loader)
        assert len(epoch) == 4
        for batch in epoch:
            assert len(batch["key"]) == 8 and tuple(batch["image"].shape[-2:]) in SHAPES
            assert set(batch["bucket_fill"]) <= {"32x32", "48x32", "32x48"}
            assert all(held < 8 for held in batch["bucket_fill"].values())
            seen.add(tuple(batch["image"].shape[-2:]))
    assert seen == SHAPES


def test_validation_batches_are_of_one_bucket_and_cover_every_sample(tiny_mixed_shards):
    urls = expand_urls(tiny_mixed_shards["val_urls"])
    pipeline = build_pipeline(urls, loader_cfg(val_batch_size=8, bucket_cap=12), train=False)
    first = list(pipeline)
    keys = [key for batch in first for key in batch["key"]]
    assert len(keys) == len(set(keys)) == 64
    assert all(tuple(b["image"].shape[-2:]) in SHAPES and len(b["key"]) <= 8 for b in first)
    assert keys == [key for batch in pipeline for key in batch["key"]]  # deterministic


# ---------------------------------------------------------------- bounded memory, no starving


def skewed_stream(n: int, seed: int = 0):
    """n tiny samples: 95% square, 2.5% each of two rare shapes."""
    rng = random.Random(seed)
    for index in range(n):
        draw = rng.random()
        shape = (4, 4) if draw < 0.95 else (4, 6) if draw < 0.975 else (6, 4)
        yield (0, index), {"image": torch.full((3, *shape), float(index)), "key": str(index)}


def batch_skewed_stream(cap: int | None) -> tuple[BucketBatcher, set, int]:
    """Feed 4000 skewed samples in batches of 16, checking each batch and the memory bound;
    returns the batcher, the shapes its batches had and the longest a sample waited (samples)."""
    batcher, emitted, added_at = BucketBatcher(batch_size=16, cap=cap), [], {}
    bound = cap if cap is not None else 3 * 15  # without a cap: batch_size - 1 per bucket
    shapes_out, longest_wait = set(), 0
    for position, sample in skewed_stream(4000):
        added_at[sample["key"]] = position[1]
        for batch in batcher.add(sample, position):
            assert len(batch) == 16 and len({shape_of(s) for s in batch}) == 1
            shapes_out.add(shape_of(batch[0]))
            emitted += [s["key"] for s in batch]
            longest_wait = max([longest_wait] + [position[1] - added_at[s["key"]] for s in batch])
        assert batcher.held() <= bound
    held = [h.sample["key"] for bucket in batcher.buckets.values() for h in bucket]
    assert sorted(emitted + held, key=int) == [str(i) for i in range(4000)]  # each once
    return batcher, shapes_out, longest_wait


def test_memory_is_bounded_with_a_skewed_distribution_and_nothing_is_dropped():
    """95% of one shape: without a cap the rare buckets fill and go out as batches of their own
    (each holds < a batch); with one, their samples move into the nearest bucket before they
    pile up, and no sample waits as long."""
    free, free_shapes, free_wait = batch_skewed_stream(None)
    assert free_shapes == {(4, 4), (4, 6), (6, 4)} and free.moved == 0
    capped, _, capped_wait = batch_skewed_stream(24)
    assert capped.moved > 0 and capped_wait < free_wait


def test_moved_samples_are_resized_to_cover_and_centre_cropped():
    batcher = BucketBatcher(batch_size=4, cap=4)
    wide = {"image": torch.arange(24.0).view(1, 4, 6).expand(3, 4, 6).clone(), "key": "w"}
    for index, sample in enumerate([wide] + [{"image": torch.zeros(3, 4, 4)}] * 3, start=1):
        assert list(batcher.add({"key": str(index), **sample}, (0, index))) == []
    tall = {"image": torch.zeros(3, 6, 4), "key": "5"}  # held 5 > cap: the oldest bucket moves
    (batch,) = batcher.add(tall, (0, 5))
    assert [s["key"] for s in batch] == ["w", "2", "3", "4"]  # into the square one, oldest first
    assert batch[0]["image"].shape == (3, 4, 4) and batcher.moved == 1
    assert torch.equal(batch[0]["image"][0], wide["image"][0, :, 1:5])  # the centre 4 columns


# ---------------------------------------------------------------- exact resume


@pytest.mark.parametrize("cap", [None, 10])
def test_a_stream_restored_from_its_state_goes_on_with_the_same_batches(tiny_mixed_shards, cap):
    """Held samples that span a pass boundary are decoded again from their positions."""
    urls = expand_urls(tiny_mixed_shards["train_urls"])[:1]  # 64 samples a pass
    cfg = loader_cfg(crop="random", random_flip=True, batches_per_epoch=3, bucket_cap=cap)
    straight = build_pipeline(urls, cfg, train=True)
    for epoch in range(6):
        list(straight)
        restored = build_pipeline(urls, cfg, train=True)
        restored.load_state_dict(straight.state_dict())
        assert list(restored) == []  # saved at an epoch's end: the rest of it is empty
        expected, got = list(straight), list(restored)
        assert [b["key"] for b in got] == [b["key"] for b in expected], epoch
        assert all(torch.equal(a["image"], b["image"]) for a, b in zip(expected, got, strict=True))
    assert straight.position.pass_index >= 2 and straight.state_dict()["buckets"]["held"]


class ShapeRecorder(L.LightningModule):
    """A tiny model that remembers the keys and shapes of every batch it trained on."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Linear(3, 1)
        self.seen: list[tuple] = []

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.seen.append((tuple(batch["key"]), tuple(batch["image"].shape)))
        features = batch["image"].mean(dim=(2, 3))
        return (self.net(features) - features.std()).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=0.01)

    def export(self, out_dir: Path) -> Path:
        return out_dir


def recorded_run(mixed_cfg, steps: int, workers: int, *extra: str) -> ShapeRecorder:
    return train_recorder(mixed_cfg, ShapeRecorder, steps, workers, "data.bucket_cap=12", *extra)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_with_buckets_ends_with_the_same_weights(mixed_cfg, workers):
    straight = recorded_run(mixed_cfg, 12, workers, "experiment_name=straight")
    first = recorded_run(mixed_cfg, 7, workers, "experiment_name=cut", "checkpoint_every_n_steps=7")
    resumed = recorded_run(mixed_cfg, 12, workers, "experiment_name=cut")
    assert first.seen + resumed.seen == straight.seen
    assert {shape[-2:] for _, shape in straight.seen} == SHAPES
    assert_same_parameters(straight, resumed)


# ---------------------------------------------------------------- DDP


class StepCounter(L.Callback):
    """Writes each rank's batch shapes to <run_dir>/shapes-rank<N>.json."""

    def __init__(self) -> None:
        self.shapes: list[list[int]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.shapes.append(list(batch["image"].shape))

    def on_train_end(self, trainer, pl_module) -> None:
        write_rank_record(trainer, "shapes", self.shapes)


@pytest.mark.slow
def test_every_ddp_rank_runs_the_same_steps_with_buckets(tmp_path, tiny_mixed_shards, run_cli):
    """stage=clip (whose loss gathers equal batches from both ranks) on 2 gloo processes."""
    args = [
        "-m",
        "ldm_train",
        "stage=clip",
        "data=shapes_mixed",
        f"paths.output_root={tmp_path}",
        f"data.train_urls='{tiny_mixed_shards['train_urls']}'",
        f"data.val_urls='{tiny_mixed_shards['val_urls']}'",
        "data.make_dataset=null",
        "data.num_workers=1",
        "data.batch_size=8",
        "data.batches_per_epoch=3",
        "data.bucket_cap=12",
        "model.net.text_cfg.layers=1",
        "logger=csv",
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.precision=32-true",
        "trainer.max_steps=7",
        "trainer.log_every_n_steps=1",
        "trainer.limit_val_batches=1",
        "trainer.enable_progress_bar=false",
        f"+callbacks.shapes={{_target_:{__name__}.StepCounter}}",
    ]
    run_cli(args, tmp_path, timeout=600)
    run_dir = tmp_path / "shapes_mixed" / "clip"
    ranks = read_rank_records(run_dir, "shapes")
    assert len(ranks[0]) == len(ranks[1]) == 7
    assert all(shape[0] == 8 for rank in ranks for shape in rank)
    assert {tuple(s[-2:]) for rank in ranks for s in rank} - SHAPES == set()
    assert len({tuple(s[-2:]) for rank in ranks for s in rank}) > 1
    assert math.isfinite(float(last_metric(run_dir, "train/contrastive")))
    assert float(last_metric(run_dir, "data/bucket_moved")) >= 0  # logged, summed over ranks


def last_metric(run_dir: Path, name: str) -> str:
    (metrics,) = (run_dir / "csv").rglob("metrics.csv")
    rows = metrics.read_text().splitlines()
    header = rows[0].split(",")
    column = header.index(name)
    return [row.split(",")[column] for row in rows[1:] if row.split(",")[column]][-1]
