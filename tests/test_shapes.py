"""The embedded shapes dataset: attributes, captions, rendering, shards, atomic writing, CLI."""

from __future__ import annotations

import io
import itertools
import json
import logging
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from ldm_train.data import shapes
from ldm_train.data.shapes import (
    COLOURS,
    POSITIONS,
    SHAPES,
    SIZES,
    caption,
    make_shapes_dataset,
    render,
    sample_attributes,
    shards_exist,
)

SMALL = dict(image_size=32, n_train=40, n_val=8, train_shards=4, val_shards=2, seed=0)


def read_split(root: Path, split: str) -> list[dict]:
    urls = [str(path) for path in sorted(root.glob(f"{split}-*.tar"))]
    return list(wds.WebDataset(urls, shardshuffle=False))


def decode_png(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes") / "shapes-32"
    return make_shapes_dataset(root, progress=False, **SMALL)


def test_caption_wording():
    attrs = {"shape": "circle", "colour": "red", "size": "small", "background": "blue"}
    assert (
        caption({**attrs, "position": "top left"})
        == "a small red circle at the top left on a blue background"
    )
    assert (
        caption({**attrs, "position": "center"})
        == "a small red circle in the center on a blue background"
    )


def test_attributes_cover_every_value_and_background_differs():
    rng = random.Random(1)
    draws = [sample_attributes(rng) for _ in range(2000)]
    assert all(attrs["background"] != attrs["colour"] for attrs in draws)
    assert {attrs["shape"] for attrs in draws} == set(SHAPES)
    assert {attrs["colour"] for attrs in draws} == set(COLOURS)
    assert {attrs["background"] for attrs in draws} == set(COLOURS)
    assert {attrs["size"] for attrs in draws} == set(SIZES)
    assert {attrs["position"] for attrs in draws} == set(POSITIONS)


def shape_mask(image: Image.Image, background: str) -> np.ndarray:
    pixels = np.asarray(image).astype(int)
    return np.abs(pixels - np.array(COLOURS[background])).sum(axis=-1) > 0


# (x, y) side of the image each position puts the shape's bounding box on.
EXPECTED_SIDES = {
    "top left": ("low", "low"),
    "top right": ("high", "low"),
    "bottom left": ("low", "high"),
    "bottom right": ("high", "high"),
    "center": ("mid", "mid"),
}


def side(coordinate: float) -> str:
    return "low" if coordinate < 0.4 else "high" if coordinate > 0.6 else "mid"


@pytest.mark.parametrize("image_size", [32, 64, 128])
def test_render_stays_inside_and_in_the_named_place(image_size):
    for shape, size, position, jitter in itertools.product(
        SHAPES, SIZES, POSITIONS, itertools.product((-1.0, 1.0), repeat=2)
    ):
        attrs = dict(shape=shape, colour="white", size=size, position=position)
        attrs.update(background="black", jitter=list(jitter))
        image = render(attrs, image_size)
        assert image.size == (image_size, image_size) and image.mode == "RGB"
        mask = shape_mask(image, "black")
        # Never cropped: the outermost ring of pixels is pure background.
        assert not (mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any())
        rows, cols = np.nonzero(mask)
        box_x = (cols.min() + cols.max() + 1) / 2 / image_size
        box_y = (rows.min() + rows.max() + 1) / 2 / image_size
        assert (side(box_x), side(box_y)) == EXPECTED_SIDES[position], attrs


@pytest.mark.parametrize("width,height", [(48, 32), (32, 48), (64, 32)])
def test_non_square_canvases_keep_shapes_inside_in_place_and_sized_by_the_shorter_side(
    width, height
):
    for shape, size, position, jitter in itertools.product(
        SHAPES, SIZES, POSITIONS, itertools.product((-1.0, 1.0), repeat=2)
    ):
        attrs = dict(shape=shape, colour="white", size=size, position=position)
        attrs.update(background="black", jitter=list(jitter))
        image = render(attrs, width, height)
        assert image.size == (width, height)
        mask = shape_mask(image, "black")
        assert not (mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any())
        rows, cols = np.nonzero(mask)
        box = (
            (cols.min() + cols.max() + 1) / 2 / width,
            (rows.min() + rows.max() + 1) / 2 / height,
        )
        assert (side(box[0]), side(box[1])) == EXPECTED_SIDES[position], attrs
        if shape == "circle":  # round, not stretched with the canvas
            assert abs((cols.max() - cols.min()) - (rows.max() - rows.min())) <= 1


def test_canvases_are_drawn_per_sample_and_leave_the_attributes_as_they_were(dataset, tmp_path):
    canvases = [[32, 32], [48, 32], [32, 48]]
    mixed = make_shapes_dataset(tmp_path / "mixed", progress=False, canvases=canvases, **SMALL)
    samples, square = read_split(mixed, "train"), read_split(dataset, "train")
    sizes = [decode_png(s["png"]).size for s in samples]
    assert set(sizes) == {(32, 32), (48, 32), (32, 48)}
    for sample, plain, size in zip(samples, square, sizes, strict=True):
        meta = json.loads(sample["json"])
        assert tuple(meta.pop("canvas")) == size
        assert meta == json.loads(plain["json"]) and sample["txt"] == plain["txt"]


def test_small_and_large_differ_in_area():
    attrs = dict(shape="square", colour="red", position="center", background="blue")
    small = shape_mask(render({**attrs, "size": "small"}, 32), "blue").mean()
    large = shape_mask(render({**attrs, "size": "large"}, 32), "blue").mean()
    assert 0.04 < small < 0.12 and 0.18 < large < 0.35


def test_shard_and_sample_counts(dataset):
    assert shards_exist(dataset, 4, 2)
    assert sorted(path.name for path in dataset.glob("*.tar")) == [
        *(f"train-{index:06d}.tar" for index in range(4)),
        *(f"val-{index:06d}.tar" for index in range(2)),
    ]
    for split, per_shard in (("train", 10), ("val", 4)):
        for path in sorted(dataset.glob(f"{split}-*.tar")):
            assert len(list(wds.WebDataset(str(path), shardshuffle=False))) == per_shard
    train, val = read_split(dataset, "train"), read_split(dataset, "val")
    assert [sample["__key__"] for sample in train] == [f"train-{i:08d}" for i in range(40)]
    assert [sample["__key__"] for sample in val] == [f"val-{i:08d}" for i in range(8)]


def test_every_sample_is_consistent(dataset):
    for sample in read_split(dataset, "train") + read_split(dataset, "val"):
        assert {"png", "txt", "json"} <= set(sample)
        text = sample["txt"].decode("utf-8")
        meta = json.loads(sample["json"])
        assert meta["caption"] == text == caption(meta)
        assert f"{meta['size']} {meta['colour']} {meta['shape']}" in text
        assert text.endswith(f"on a {meta['background']} background")
        assert meta["background"] != meta["colour"]
        image = decode_png(sample["png"])
        assert image.size == (32, 32) and image.mode == "RGB"
        assert np.array_equal(np.asarray(image), np.asarray(render(meta, 32)))


def test_same_seed_same_bytes_other_seed_other_data(dataset, tmp_path):
    again = make_shapes_dataset(tmp_path / "again", progress=False, **SMALL)
    for path in sorted(dataset.glob("*.tar")):
        assert (again / path.name).read_bytes() == path.read_bytes()

    other = make_shapes_dataset(tmp_path / "other", progress=False, **{**SMALL, "seed": 1})
    captions = [sample["txt"] for sample in read_split(dataset, "train")]
    assert [sample["txt"] for sample in read_split(other, "train")] != captions


def test_val_is_not_a_copy_of_train(dataset):
    train = [sample["json"] for sample in read_split(dataset, "train")]
    val = [sample["json"] for sample in read_split(dataset, "val")]
    assert val != train[: len(val)]


def test_content_does_not_depend_on_shard_count(dataset, tmp_path):
    resharded = make_shapes_dataset(
        tmp_path / "resharded", progress=False, **{**SMALL, "train_shards": 1, "val_shards": 1}
    )
    assert [s["png"] for s in read_split(resharded, "train")] == [
        s["png"] for s in read_split(dataset, "train")
    ]


def test_complete_dataset_is_not_rewritten(dataset, monkeypatch):
    mtimes = {path: path.stat().st_mtime_ns for path in dataset.iterdir()}

    def must_not_write(*args, **kwargs):
        raise AssertionError("complete dataset was written again")

    monkeypatch.setattr(shapes, "_write_split", must_not_write)
    assert make_shapes_dataset(dataset, progress=False, **SMALL) == dataset
    assert {path: path.stat().st_mtime_ns for path in dataset.iterdir()} == mtimes


def test_interrupted_run_leaves_nothing_behind(tmp_path, monkeypatch):
    real_write_split = shapes._write_split

    def fail_on_val(directory, split, *args):
        if split == "val":
            raise KeyboardInterrupt
        real_write_split(directory, split, *args)

    monkeypatch.setattr(shapes, "_write_split", fail_on_val)
    with pytest.raises(KeyboardInterrupt):
        make_shapes_dataset(tmp_path / "shapes", progress=False, **SMALL)
    assert list(tmp_path.iterdir()) == []


def test_fills_a_folder_holding_a_partial_dataset(tmp_path):
    root = tmp_path / "shapes"
    root.mkdir()
    (root / "train-000000.tar").write_bytes(b"truncated")
    make_shapes_dataset(root, progress=False, **SMALL)
    assert shards_exist(root, 4, 2)
    assert len(read_split(root, "train")) == 40
    assert sorted(path.name for path in tmp_path.iterdir()) == ["shapes"]  # no tmp folder left


def test_concurrent_writer_that_finishes_second_keeps_the_first_dataset(dataset, tmp_path):
    before = {path.name: path.read_bytes() for path in dataset.iterdir()}
    late = make_shapes_dataset(tmp_path / "late", progress=False, **{**SMALL, "seed": 1})
    shapes._publish(late, dataset, SMALL["train_shards"], SMALL["val_shards"])
    assert {path.name: path.read_bytes() for path in dataset.iterdir()} == before


def test_warns_when_existing_dataset_was_made_differently(dataset, caplog):
    with caplog.at_level(logging.WARNING, logger="ldm_train.data.shapes"):
        make_shapes_dataset(dataset, progress=False, **{**SMALL, "image_size": 64})
    assert "delete the folder" in caplog.text


def test_rejects_fewer_samples_than_shards(tmp_path):
    with pytest.raises(ValueError, match="one sample per shard"):
        make_shapes_dataset(tmp_path / "x", n_train=2, train_shards=4, progress=False)


def test_cli(tmp_path):
    out = tmp_path / "cli"
    args = ["--out", str(out), "--image-size", "16", "--n-train", "6", "--n-val", "2"]
    args += ["--train-shards", "2", "--val-shards", "1", "--seed", "3", "--quiet"]
    result = subprocess.run(
        [sys.executable, "-m", "ldm_train.data.shapes", *args],
        capture_output=True,
        text=True,
        check=True,
    )
    assert str(out) in result.stdout
    assert shards_exist(out, 2, 1)
    image = decode_png(read_split(out, "train")[0]["png"])
    assert image.size == (16, 16)
