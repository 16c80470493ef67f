"""The WebDataset loader: batches, epochs, seeds, bad data, ranks, image modes, DataModule."""

from __future__ import annotations

import io
import itertools
import logging
import random
import signal
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset

from ldm_train.data import samples
from ldm_train.data.captions import shuffle_tags
from ldm_train.data.datamodule import WebDataModule, check_shards_exist, expand_urls
from ldm_train.data.stream import LoaderConfig, NoValidSamplesError, build_pipeline, to_rgb
from ldm_train.errors import UserError

SIZE = 32


# ---------------------------------------------------------------- helpers


def loader_cfg(**overrides) -> LoaderConfig:
    """Small, CPU-friendly loader options (no workers, small shuffle buffer)."""
    options = dict(
        image_size=SIZE, batch_size=8, num_workers=0, shuffle_buffer=16, batches_per_epoch=4
    )
    return LoaderConfig(**{**options, **overrides})


def png(size: tuple[int, int] = (SIZE, SIZE), colour=(200, 30, 30), mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def good(key: str, **extra) -> dict:
    return {"__key__": key, "png": png(), "txt": f"caption of {key}".encode(), **extra}


def write_tar(path: Path, samples: list[dict]) -> str:
    with wds.TarWriter(str(path)) as writer:
        for sample in samples:
            writer.write(sample)
    return str(path)


def good_tar(path: Path, prefix: str, n: int) -> tuple[str, set[str]]:
    keys = [f"{prefix}-{i:03d}" for i in range(n)]
    return write_tar(path, [good(key) for key in keys]), set(keys)


def truncated_copy(src: str, dst: Path) -> str:
    """src cut inside a member's data (a cut on a header boundary reads as a clean end)."""
    with tarfile.open(src) as tar:
        member = tar.getmembers()[len(tar.getmembers()) // 2]
    data = Path(src).read_bytes()
    dst.write_bytes(data[: member.offset_data + member.size // 2])
    return str(dst)


def val_pass(urls: list[str], **overrides) -> tuple[list[str], int]:
    """Keys and total skipped count of one validation pass."""
    keys, skipped = [], 0
    for batch in build_pipeline(urls, loader_cfg(**overrides), train=False):
        keys += batch["key"]
        skipped += batch["skipped"]
    return keys, skipped


def epoch_keys(pipeline) -> list[str]:
    return [key for batch in pipeline for key in batch["key"]]


def first_batch_error(pipeline, timeout: float = 10.0) -> BaseException | None:
    """The exception the first batch raises (None if it comes); fails instead of hanging."""
    outcome: list[BaseException | None] = []

    def run():
        try:
            next(iter(pipeline))
            outcome.append(None)
        except BaseException as error:
            outcome.append(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    assert outcome, f"pipeline neither yielded nor raised within {timeout} s"
    return outcome[0]


@pytest.fixture
def train_urls(tiny_shards) -> list[str]:
    return expand_urls(tiny_shards["train_urls"])


@pytest.fixture
def val_urls(tiny_shards) -> list[str]:
    return expand_urls(tiny_shards["val_urls"])


def shard_of(key: str) -> int:
    """The embedded shards hold 64 consecutive train samples each: train-00000070 -> shard 1."""
    return int(key.rsplit("-", 1)[1]) // 64


# ---------------------------------------------------------------- 1. shapes, ranges, dtypes


def test_train_batch_shapes_dtypes_and_range(train_urls):
    """A training batch: float32 B x 3 x 32 x 32 in [-1, 1] using the range; str captions/keys."""
    batch = next(iter(build_pipeline(train_urls, loader_cfg(), train=True)))
    image = batch["image"]
    assert image.dtype == torch.float32 and image.shape == (8, 3, SIZE, SIZE)
    assert image.min() >= -1 and image.max() <= 1
    assert image.min() < -0.5 and image.max() > 0.5
    assert len(batch["caption"]) == 8 and all(isinstance(c, str) and c for c in batch["caption"])
    assert len(batch["key"]) == 8 and all(isinstance(k, str) and k for k in batch["key"])
    assert type(batch["skipped"]) is int and batch["skipped"] == 0


def test_val_pass_finite_deterministic_complete(val_urls):
    """Validation: finite values, same keys in the same order twice, all 64 once, partial tail."""
    pipeline = build_pipeline(val_urls, loader_cfg(val_batch_size=24), train=False)
    first = list(pipeline)
    assert [len(b["key"]) for b in first] == [24, 24, 16]
    assert all(torch.isfinite(b["image"]).all() for b in first)
    keys = [k for b in first for k in b["key"]]
    assert keys == [k for b in pipeline for k in b["key"]]
    assert len(keys) == len(set(keys)) == 64


# ---------------------------------------------------------------- 2. training stream


def test_with_epoch_counts_and_stream_goes_on(train_urls):
    """Exactly batches_per_epoch full batches per epoch, and the next epoch yields again."""
    pipeline = build_pipeline(train_urls, loader_cfg(batches_per_epoch=5), train=True)
    for _ in range(2):
        batches = list(pipeline)
        assert len(batches) == 5 and all(len(b["key"]) == 8 for b in batches)


def test_stream_runs_past_one_pass(train_urls):
    """An epoch longer than the data (256 samples) rereads the shards instead of ending."""
    pipeline = build_pipeline(train_urls[:1], loader_cfg(batches_per_epoch=20), train=True)
    keys = epoch_keys(pipeline)
    assert len(keys) == 160 and len(set(keys)) == 64


def test_next_epoch_continues_the_stream(train_urls):
    """Epoch 2 continues where epoch 1 stopped instead of replaying the same samples."""
    pipeline = build_pipeline(train_urls, loader_cfg(), train=True)
    assert epoch_keys(pipeline) != epoch_keys(pipeline)


@pytest.mark.parametrize("batches", [4, 5])
def test_datamodule_epochs_with_two_workers(tiny_shards, batches):
    """Through the DataModule's DataLoader (2 workers): batches_per_epoch batches, twice."""
    cfg = loader_cfg(num_workers=2, batches_per_epoch=batches)
    module = WebDataModule(tiny_shards["train_urls"], tiny_shards["val_urls"], cfg)
    module.setup("fit")
    loader = module.train_dataloader()
    for _ in range(2):
        epoch = list(loader)
        assert len(epoch) == batches
        assert all(b["image"].shape == (8, 3, SIZE, SIZE) for b in epoch)
        assert all(type(b["skipped"]) is int for b in epoch)
        keys = [k for b in epoch for k in b["key"]]
        assert len(keys) == len(set(keys))  # the two workers read different shards


def test_seed_decides_the_order(train_urls):
    """Same seed -> same first batches' keys; another seed -> different ones."""

    def first_keys(seed: int) -> list[str]:
        pipeline = build_pipeline(
            train_urls, loader_cfg(seed=seed, batches_per_epoch=2), train=True
        )
        return epoch_keys(pipeline)

    assert first_keys(1) == first_keys(1)
    assert first_keys(1) != first_keys(2)


# ---------------------------------------------------------------- 3. bad data skipped and counted


BAD_SAMPLES = {
    "undecodable jpg": {"jpg": b"these bytes are not an image", "txt": b"a caption"},
    "no caption": {"png": png()},
    "empty caption": {"png": png(), "txt": b""},
    "blank caption": {"png": png(), "txt": b"  \n"},
    "caption not utf-8": {"png": png(), "txt": b"caf\xe9 \xff\xfe"},
    "json caption not a str": {"png": png(), "json": b'{"caption": 3}'},
    "no image": {"txt": b"a caption"},
    # json.loads raises RecursionError (not a ValueError) on nesting this deep.
    "json nested too deep": {"png": png(), "txt": b"x", "json": b"[" * 100_000 + b"]" * 100_000},
    # Its resize to 32 px would hold 614 M pixels (about 3 GB as the loader handles them).
    "too many pixels": {"png": png((1, 600_000), (0, 0, 0)), "txt": b"a strip"},
}


@pytest.mark.parametrize("buckets", [None, [[32, 32], [64, 16]]])
def test_an_image_of_too_many_pixels_is_skipped_before_it_is_resized(buckets, monkeypatch):
    cfg = loader_cfg(buckets=buckets, bucket_step=16)
    stats = samples.StreamStats()
    resized = []
    monkeypatch.setattr(Image.Image, "resize", lambda *a, **k: resized.append(a) or None)
    for size in [(1, 600_000), (40_000, 1)]:
        sample = {"__key__": "strip", "png": png(size, (0, 0, 0)), "txt": b"a strip"}
        transform = samples.image_transform(cfg, train=False)
        assert samples.decode_sample(sample, cfg, transform, stats) is None
    assert stats.skipped == {"too many pixels": 2} and not resized


@pytest.mark.parametrize("kind", BAD_SAMPLES)
def test_bad_samples_skipped_and_counted(tmp_path, kind):
    """Two bad samples among good ones: the good ones all come through, skipped == 2."""
    bad = [{"__key__": f"bad-{i}", **BAD_SAMPLES[kind]} for i in range(2)]
    samples = [good("a-0"), good("a-1"), bad[0], good("a-2"), bad[1], good("a-3")]
    other, other_keys = good_tar(tmp_path / "b.tar", "b", 5)
    keys, skipped = val_pass([write_tar(tmp_path / "a.tar", samples), other], batch_size=4)
    assert sorted(keys) == sorted({"a-0", "a-1", "a-2", "a-3"} | other_keys)
    assert skipped == 2


@pytest.mark.parametrize("error", [RecursionError, KeyError, ZeroDivisionError, MemoryError])
def test_any_error_from_one_sample_is_skipped_and_counted_by_name(tmp_path, monkeypatch, error):
    """Whatever decoding one sample raises, the stream goes on; the skip is counted by its name."""
    read_caption = samples.read_caption

    def failing(sample, keys, meta):
        if sample["__key__"] == "bad":
            raise error("from one sample")
        return read_caption(sample, keys, meta)

    monkeypatch.setattr(samples, "read_caption", failing)
    url = write_tar(tmp_path / "a.tar", [good("a-0"), good("bad"), good("a-1")])
    stream = build_pipeline([url], loader_cfg(), train=False)
    (batch,) = stream
    assert batch["key"] == ["a-0", "a-1"] and batch["skipped"] == 1
    assert stream.stats.skipped == {f"sample raised {error.__name__}": 1}


def test_user_error_while_decoding_still_ends_the_run(tmp_path, monkeypatch):
    """A configuration that cannot work (e.g. flips asked of a cache without them) is not skipped."""

    def cannot_work(*args, **kwargs):
        raise samples.CacheError("cached with data.random_flip=false")

    monkeypatch.setattr(samples, "decode_members", cannot_work)
    url = write_tar(tmp_path / "a.tar", [good("a-0")])
    with pytest.raises(samples.CacheError, match="random_flip"):
        next(iter(build_pipeline([url], loader_cfg(), train=False)))


def test_exif_rotated_jpeg_decodes_upright(tmp_path):
    """A phone photo stores its pixels sideways and the rotation in EXIF (Orientation 6: turn 90
    degrees clockwise to view): red left half, blue right half stored, so red on top when upright."""
    stored = np.zeros((SIZE, 2 * SIZE, 3), np.uint8)
    stored[:, :SIZE] = (255, 0, 0)
    stored[:, SIZE:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation
    buffer = io.BytesIO()
    Image.fromarray(stored).save(buffer, format="JPEG", quality=95, exif=exif.tobytes())
    sample = {"__key__": "phone", "jpg": buffer.getvalue(), "txt": b"a photo"}
    (batch,) = build_pipeline([write_tar(tmp_path / "p.tar", [sample])], loader_cfg(), train=False)
    image = batch["image"][0]  # 32 x 32: the centre of the upright 32 wide x 64 high image
    top, bottom = image[:, : SIZE // 2 - 2], image[:, SIZE // 2 + 2 :]
    assert top[0].mean() > 0.8 and top[2].mean() < -0.8  # red
    assert bottom[2].mean() > 0.8 and bottom[0].mean() < -0.8  # blue


def test_caption_from_json_when_no_txt(tmp_path):
    """A json "caption" serves when no caption key is present."""
    url = write_tar(
        tmp_path / "a.tar", [{"__key__": "j", "png": png(), "json": b'{"caption": "hi"}'}]
    )
    (batch,) = build_pipeline([url], loader_cfg(), train=False)
    assert batch["caption"] == ["hi"] and batch["skipped"] == 0


@pytest.mark.parametrize("kind", ["garbage", "truncated", "missing"])
def test_unreadable_shard_skipped_and_counted(tmp_path, train_urls, kind):
    """A garbage, truncated or missing shard among good ones: all good samples, skipped >= 1."""
    good_url, good_keys = good_tar(tmp_path / "good.tar", "g", 10)
    bad_path = tmp_path / "bad.tar"
    if kind == "garbage":
        bad_path.write_bytes(b"this is not a tar archive\n" * 100)
    elif kind == "truncated":
        truncated_copy(train_urls[0], bad_path)
    keys, skipped = val_pass([str(bad_path), good_url], batch_size=4)
    assert good_keys <= set(keys) and len(keys) == len(set(keys))
    if kind == "truncated":
        assert 0 < len(set(keys) - good_keys) < 64  # the intact head of the cut shard
        assert all(shard_of(k) == 0 for k in set(keys) - good_keys)
    else:
        assert set(keys) == good_keys
        assert skipped == 1
    assert skipped >= 1


def test_training_skips_bad_shards(tmp_path, train_urls):
    """Training over a garbage shard, a missing one and a good one: full batches, skips counted."""
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"\x13\x37 not a tar" * 300)
    urls = [str(garbage), str(tmp_path / "missing.tar"), train_urls[0]]
    batches = list(build_pipeline(urls, loader_cfg(batches_per_epoch=10), train=True))
    assert len(batches) == 10 and all(len(b["key"]) == 8 for b in batches)
    assert {shard_of(k) for b in batches for k in b["key"]} == {0}
    assert sum(b["skipped"] for b in batches) >= 2


# ---------------------------------------------------------------- 4. no valid sample at all


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("kind", ["corrupt shards", "undecodable images"])
def test_no_valid_sample_raises_naming_urls(tmp_path, train, kind):
    """Nothing usable in a whole pass -> NoValidSamplesError naming the URLs, not a hang."""
    urls = []
    for i in range(2):
        path = tmp_path / f"bad-{i}.tar"
        if kind == "corrupt shards":
            path.write_bytes(b"garbage " * 200)
        else:
            write_tar(
                path, [{"__key__": f"k{i}{j}", "jpg": b"nope", "txt": b"x"} for j in range(3)]
            )
        urls.append(str(path))
    error = first_batch_error(build_pipeline(urls, loader_cfg(shuffle_buffer=1000), train=train))
    assert isinstance(error, NoValidSamplesError), error
    assert all(url in str(error) for url in urls)


def test_no_valid_sample_in_a_loader_worker_is_one_line(tmp_path):
    """Raised in a DataLoader worker, torch re-raises it with the worker's traceback in the
    message; what reaches the user is the UserError's one line."""
    url = write_tar(tmp_path / "bad.tar", [{"__key__": "k", "jpg": b"nope", "txt": b"x"}])
    stream = build_pipeline([url], loader_cfg(), train=False)
    loader = DataLoader(stream, batch_size=None, num_workers=1)
    with pytest.raises(NoValidSamplesError) as error:
        next(iter(loader))
    assert isinstance(error.value, UserError)
    assert str(error.value).startswith(f"no valid sample in ['{url}']")
    assert "\n" not in str(error.value) and "Traceback" not in str(error.value)


# ---------------------------------------------------------------- 5. ranks see disjoint samples


def rank_keys(urls: list[str], rank: int, train: bool, **overrides) -> list[str]:
    cfg = loader_cfg(**overrides)
    return epoch_keys(build_pipeline(urls, cfg, train=train, rank=rank, world_size=2))


def test_two_ranks_take_disjoint_shards(train_urls):
    """4 shards, 2 ranks, one epoch inside the first pass: each rank reads 2 shards of its own."""
    keys = [rank_keys(train_urls, rank, train=True, batches_per_epoch=12) for rank in (0, 1)]
    shards = [{shard_of(k) for k in rank} for rank in keys]
    assert all(keys) and not set(keys[0]) & set(keys[1])
    assert len(shards[0]) == len(shards[1]) == 2 and shards[0] | shards[1] == {0, 1, 2, 3}


def test_two_ranks_split_one_shard_by_sample(train_urls):
    """1 shard, 2 ranks over 3 passes: each rank keeps its own half of the 64 samples."""
    keys = [
        set(rank_keys(train_urls[:1], rank, train=True, batches_per_epoch=12)) for rank in (0, 1)
    ]
    assert len(keys[0]) == len(keys[1]) == 32
    assert not keys[0] & keys[1] and {shard_of(k) for k in keys[0] | keys[1]} == {0}


def test_split_shard_with_default_shuffle_buffer(train_urls):
    """1 shard, 2 ranks with the default shuffle buffer (1000 > 32 samples a pass) still trains."""
    keys = rank_keys(train_urls[:1], 0, train=True, shuffle_buffer=1000)
    assert len(keys) == 32


@pytest.mark.parametrize("n_shards, n_samples", [(2, 64), (1, 32)])
def test_two_ranks_val_disjoint_and_complete(val_urls, n_shards, n_samples):
    """Validation on 2 ranks (by shard, or by sample from one shard): disjoint, union is all."""
    keys = [rank_keys(val_urls[:n_shards], rank, train=False) for rank in (0, 1)]
    assert all(keys) and not set(keys[0]) & set(keys[1])
    assert len(keys[0]) + len(keys[1]) == len(set(keys[0]) | set(keys[1])) == n_samples


# ---------------------------------------------------------------- 6. image modes


def palette(transparent: bool) -> Image.Image:
    image = Image.new("P", (4, 4), 0)
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    if transparent:
        image.info["transparency"] = 0
    return image


@pytest.mark.parametrize(
    "image, expected",
    [
        pytest.param(Image.new("L", (4, 4), 128), (128,) * 3, id="L"),
        pytest.param(Image.new("LA", (4, 4), (0, 0)), (255,) * 3, id="LA-clear"),
        pytest.param(Image.new("LA", (4, 4), (0, 255)), (0,) * 3, id="LA-opaque"),
        pytest.param(palette(transparent=False), (255, 0, 0), id="P"),
        pytest.param(palette(transparent=True), (255,) * 3, id="P-transparent"),
        pytest.param(Image.new("RGBA", (4, 4), (0, 0, 0, 0)), (255,) * 3, id="RGBA-clear"),
        pytest.param(Image.new("RGBA", (4, 4), (10, 20, 30, 255)), (10, 20, 30), id="RGBA"),
        pytest.param(Image.new("RGBA", (4, 4), (0, 0, 0, 128)), (127,) * 3, id="RGBA-half"),
        pytest.param(Image.new("CMYK", (4, 4), (0, 255, 255, 0)), (255, 0, 0), id="CMYK"),
        pytest.param(Image.fromarray(np.full((4, 4), 65535, np.uint16)), (255,) * 3, id="I;16-max"),
        pytest.param(Image.fromarray(np.full((4, 4), 32768, np.uint16)), (128,) * 3, id="I;16-mid"),
        pytest.param(Image.new("1", (4, 4), 1), (255,) * 3, id="1-on"),
        pytest.param(Image.new("1", (4, 4), 0), (0,) * 3, id="1-off"),
    ],
)
def test_to_rgb(image, expected):
    """Every mode becomes 8-bit RGB with the right colour; transparency goes on white."""
    out = to_rgb(image)
    array = np.asarray(out)
    assert out.mode == "RGB" and array.dtype == np.uint8 and array.shape == (4, 4, 3)
    assert np.abs(array.astype(int) - expected).max() <= 1


def test_small_and_large_images_resized_and_cropped(tmp_path):
    """1x1 and 10x7 are upscaled, 300x200 resized then centre-cropped (its side bands cut off)."""
    wide = np.full((200, 300, 3), 255, np.uint8)
    wide[:, :50] = wide[:, 250:] = 0  # black bands outside the central 200 x 200 square
    buffer = io.BytesIO()
    Image.fromarray(wide).save(buffer, format="PNG")
    samples = [
        {"__key__": "tiny", "png": png((1, 1), (255, 255, 255)), "txt": b"one pixel"},
        {"__key__": "odd", "png": png((10, 7), (0, 255, 0)), "txt": b"ten by seven"},
        {"__key__": "wide", "png": buffer.getvalue(), "txt": b"wide"},
    ]
    (batch,) = build_pipeline([write_tar(tmp_path / "s.tar", samples)], loader_cfg(), train=False)
    tiny, odd, wide_out = batch["image"]
    assert batch["image"].shape == (3, 3, SIZE, SIZE)
    assert torch.allclose(tiny, torch.ones_like(tiny), atol=0.02)
    assert torch.allclose(odd[1], torch.ones_like(odd[1]), atol=0.02) and odd[0].max() < -0.95
    assert wide_out.mean() > 0.9  # a squashed (uncropped) resize would average about 0.33


# ---------------------------------------------------------------- 7. DataModule checks


def test_check_shards_exist(tmp_path, caplog):
    """No local shard: UserError naming option and URLs; some missing: only a warning."""
    urls = expand_urls(f"{tmp_path}/train-{{000..002}}.tar")
    with pytest.raises(UserError, match="data.train_urls") as error:
        check_shards_exist(urls, "data.train_urls")
    assert urls[0] in str(error.value) and urls[-1] in str(error.value)
    Path(urls[1]).write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="ldm_train.data.datamodule"):
        check_shards_exist(urls, "data.train_urls")
    assert "2 of 3 shards are missing" in caplog.text and urls[0] in caplog.text


@pytest.mark.parametrize(
    "pattern, warns", [("{000000..000000}", True), ("{000000..000003}", False)]
)
def test_setup_warns_when_fewer_shards_than_readers(tiny_shards, caplog, pattern, warns):
    """1 shard for 2 workers: setup warns and says what to do; 4 shards: no warning."""
    urls = f"{tiny_shards['root']}/train-{pattern}.tar"
    module = WebDataModule(urls, tiny_shards["val_urls"], loader_cfg(num_workers=2))
    with caplog.at_level(logging.WARNING, logger="ldm_train.data.datamodule"):
        module.setup("fit")
    assert ("for 2 readers" in caplog.text) == warns
    if warns:
        assert "at least 2 shards" in caplog.text and "data.num_workers" in caplog.text


def test_setup_checks_that_the_validation_set_has_a_sample(tiny_shards, tmp_path):
    """Every validation sample bad: a UserError naming the URLs at setup, not after an epoch."""
    bad = [
        write_tar(tmp_path / f"val-{i}.tar", [{"__key__": f"k{i}", "jpg": b"no", "txt": b"x"}])
        for i in range(2)
    ]
    module = WebDataModule(tiny_shards["train_urls"], bad, loader_cfg())
    with pytest.raises(UserError, match="data.val_urls") as error:
        module.setup("fit")
    assert all(url in str(error.value) for url in bad) and "undecodable image" in str(error.value)
    WebDataModule(tiny_shards["train_urls"], tiny_shards["val_urls"], loader_cfg()).setup("fit")


def test_missing_file_url_is_a_user_error(tiny_shards, tmp_path):
    """file:// URLs are local files: none there is the same one-line error as a missing path."""
    module = WebDataModule(f"file://{tmp_path}/nowhere-{{0..1}}.tar", None, loader_cfg())
    with pytest.raises(UserError, match=f"data.train_urls: no shard found at file://{tmp_path}"):
        module.setup("fit")


class HandlersInWorker(IterableDataset):
    def __iter__(self):
        yield {name: signal.getsignal(getattr(signal, name)) for name in ("SIGTERM", "SIGUSR1")}


@pytest.mark.parametrize("train", [True, False])
def test_loader_workers_ignore_preemption_signals(tiny_shards, train):
    """The loaders' worker_init_fn leaves SIGTERM and SIGUSR1 to the main process."""
    module = WebDataModule(tiny_shards["train_urls"], tiny_shards["val_urls"], loader_cfg())
    made = module.train_dataloader() if train else module.val_dataloader()
    seen = next(
        iter(
            DataLoader(
                HandlersInWorker(),
                batch_size=None,
                num_workers=1,
                worker_init_fn=made.worker_init_fn,
            )
        )
    )
    assert seen == {"SIGTERM": signal.SIG_IGN, "SIGUSR1": signal.SIG_IGN}


def test_from_config(make_cfg):
    """The composed data config builds the module with its options."""
    module = WebDataModule.from_config(make_cfg().data)
    assert len(module.train_urls) == 4 and len(module.val_urls) == 2
    assert module.loader.batch_size == 8 and module.loader.num_workers == 0


def test_from_config_unknown_key(make_cfg):
    """An unknown data key is a UserError that lists the valid ones."""
    with pytest.raises(UserError, match="data.bogus") as error:
        WebDataModule.from_config(make_cfg("+data.bogus=1").data)
    assert "batch_size" in str(error.value) and "shuffle_buffer" in str(error.value)


def test_from_config_bad_crop(make_cfg):
    """data.crop=diagonal is a UserError listing center and random."""
    with pytest.raises(UserError, match="diagonal") as error:
        WebDataModule.from_config(make_cfg("data.crop=diagonal").data)
    assert "center" in str(error.value) and "random" in str(error.value)


# ---------------------------------------------------------------- tag captions


def test_shuffle_tags_keeps_the_first_tags_and_reorders_the_rest_per_draw(tmp_path):
    assert shuffle_tags("sks dog, red, grass", None, random.Random(0)) == "sks dog, red, grass"
    tags = "sks dog, red collar, grass, sunny, close-up, smiling"
    draws = {shuffle_tags(tags, 1, random.Random(seed)) for seed in range(20)}
    assert len(draws) > 1 and all(d.startswith("sks dog, ") for d in draws)
    assert all(sorted(d.split(", ")) == sorted(tags.split(", ")) for d in draws)
    # In the loader: drawn from each sample's place in the stream (the same run, the same
    # captions); validation reads captions as written.
    url = write_tar(tmp_path / "tags.tar", [good(f"k{i}", txt=tags.encode()) for i in range(16)])
    cfg = loader_cfg(shuffle_tags=1, random_flip=False, batches_per_epoch=2)

    def captions(train: bool) -> list[str]:
        batches = build_pipeline([url], cfg, train=train)
        return [c for batch in itertools.islice(batches, 2) for c in batch["caption"]]

    first = captions(train=True)
    assert first == captions(train=True) and len(set(first)) > 1
    assert set(captions(train=False)) == {tags}


def test_a_local_wildcard_names_the_shards_it_matches(tmp_path):
    for name in ("train-000001.tar", "train-000000.tar", "val-000000.tar"):
        (tmp_path / name).write_bytes(b"")
    assert expand_urls(f"{tmp_path}/train-*.tar") == [
        f"{tmp_path}/train-000000.tar",
        f"{tmp_path}/train-000001.tar",
    ]
    assert expand_urls(f"{tmp_path}/none-*.tar") == [f"{tmp_path}/none-*.tar"]  # reported missing
    assert expand_urls("pipe:cat x-*.tar") == ["pipe:cat x-*.tar"]  # not a local path
