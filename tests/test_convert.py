"""Folder of images + .txt captions -> WebDataset shards: round trip, skips, keys, CLI."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from ldm_train.data import convert
from ldm_train.data.convert import convert_folder
from ldm_train.data.shards import shard_urls

IMAGE_KEYS = ("jpg", "png", "webp")


def noise(width: int = 24, height: int = 16, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def add(folder: Path, name: str, image: Image.Image | bytes, caption: str | bytes | None) -> None:
    """Write an image (or raw bytes) and, unless caption is None, its .txt next to it."""
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(image, bytes):
        path.write_bytes(image)
    else:
        image.save(path)
    if caption is not None:
        data = caption if isinstance(caption, bytes) else caption.encode("utf-8")
        path.with_suffix(".txt").write_bytes(data)


# A 16-bit grey ramp: clipped to 8 bit it would be almost all white.
RAMP_16BIT = Image.fromarray((np.arange(16 * 24).reshape(16, 24) * 170).astype(np.uint16))

# relative path -> (caption, stored key, original bytes kept)
GOOD = {
    "photo.jpg": ("an RGB photo", "jpg", True),
    "alpha.png": ("  an RGBA picture\n", "png", True),
    "grey.png": ("ein graues Bild – ü", "png", True),
    "sub/palette.gif": ("a palette gif", "png", False),
    "sub/indexed.bmp": ("a palette bmp", "png", False),
    "sub/deeper/ramp16.png": ("a 16-bit ramp", "png", False),
    "web.webp": ("a webp", "webp", True),
    "scan.TIFF": ("an upper-case tiff", "png", False),
    "long_extension.jpeg": ("a jpeg with the long extension", "jpg", True),
    "misnamed.jpg": ("a png named .jpg: stored as what it is", "png", True),
}


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src")
    photo = noise()
    images = {
        "photo.jpg": photo,
        "alpha.png": photo.convert("RGBA"),
        "grey.png": photo.convert("L"),
        "sub/palette.gif": photo.convert("P"),
        "sub/indexed.bmp": photo.convert("P"),
        "sub/deeper/ramp16.png": RAMP_16BIT,
        "web.webp": photo,
        "scan.TIFF": photo,
        "long_extension.jpeg": photo,
    }
    png = io.BytesIO()
    photo.save(png, format="PNG")
    images["misnamed.jpg"] = png.getvalue()
    for name, (caption, _, _) in GOOD.items():
        add(src, name, images[name], caption)
    add(src, "broken/garbage.jpg", b"this is not a jpeg", "garbage")
    add(src, "broken/truncated.png", png.getvalue()[:200], "cut short")
    add(src, "no_caption.png", photo, None)
    add(src, "latin1.png", photo, "caf\xe9".encode("latin-1"))
    add(src, ".hidden/ignored.png", photo, "hidden folders are ignored")
    (src / "notes.md").write_text("not an image")
    return src


@pytest.fixture(scope="module")
def converted(source, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    return out, convert_folder(source, out, shard_size=4, progress=False)


def read_samples(urls) -> list[dict]:
    return list(wds.WebDataset(urls, shardshuffle=False))


def decode(sample: dict) -> Image.Image:
    (key,) = [key for key in IMAGE_KEYS if key in sample]
    image = Image.open(io.BytesIO(sample[key]))
    image.load()
    return image


def test_report_counts_and_skips(converted):
    out, report = converted
    assert report.written == len(GOOD)
    assert report.skipped == {
        "unreadable image": ["broken/garbage.jpg", "broken/truncated.png"],
        "missing caption": ["no_caption.png"],
        "caption not UTF-8": ["latin1.png"],
    }
    assert report.shards == [out / f"train-{index:06d}.tar" for index in range(3)]  # 10 = 4+4+2
    assert sorted(out.glob("*.tar")) == report.shards


def test_round_trip_through_the_shard_urls(converted, source):
    out, report = converted
    samples = read_samples(shard_urls(out, "train", len(report.shards)))
    assert len(samples) == len(GOOD)
    by_source = {json.loads(sample["json"])["source"]: sample for sample in samples}
    assert set(by_source) == set(GOOD)
    for relative, (caption, image_key, kept) in GOOD.items():
        sample = by_source[relative]
        assert sample["txt"].decode("utf-8") == caption.strip()
        assert json.loads(sample["json"])["caption"] == caption.strip()
        assert [key for key in IMAGE_KEYS if key in sample] == [image_key]
        assert (sample[image_key] == (source / relative).read_bytes()) == kept
        image = decode(sample)
        assert image.size == (24, 16)
        assert np.asarray(image.convert("RGB")).std() > 0  # decodes to a real picture


def test_sixteen_bit_image_is_scaled_not_clipped(converted):
    out, _ = converted
    (sample,) = [
        s for s in read_samples(sorted(map(str, out.glob("*.tar")))) if b"16-bit" in s["txt"]
    ]
    image = decode(sample)
    assert image.mode == "L"
    expected = np.asarray(RAMP_16BIT, dtype=np.float64) / 257
    assert np.abs(np.asarray(image, dtype=np.float64) - expected).max() <= 1


def test_keys_are_unique_dot_free_and_in_sorted_order(converted):
    out, _ = converted
    samples = read_samples(sorted(map(str, out.glob("*.tar"))))
    keys = [sample["__key__"] for sample in samples]
    assert len(set(keys)) == len(keys)
    assert not any("." in key or "/" in key for key in keys)
    sources = [json.loads(sample["json"])["source"] for sample in samples]
    assert sources == sorted(GOOD)
    assert "sub_deeper_ramp16" in keys


def test_same_stem_different_extension_get_distinct_keys(tmp_path):
    src = tmp_path / "src"
    add(src, "cat.jpg", noise(seed=1), "a cat")
    add(src, "cat.png", noise(seed=2), None)  # shares cat.txt
    add(src, "cat_png.png", noise(seed=3), "a clash after sanitising")
    report = convert_folder(src, tmp_path / "out", progress=False)
    keys = [s["__key__"] for s in read_samples([str(p) for p in report.shards])]
    assert report.written == 3 and len(set(keys)) == 3


def test_decompression_bomb_is_skipped_not_fatal(tmp_path, monkeypatch):
    src = tmp_path / "src"
    add(src, "huge.png", noise(), "pretends to be huge")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)  # 24x16 > 2x limit -> DecompressionBombError
    report = convert_folder(src, tmp_path / "out", progress=False)
    assert report.written == 0 and report.shards == []
    assert report.skipped == {"unreadable image": ["huge.png"]}
    assert not (tmp_path / "out").exists()  # no empty shard left behind


def test_empty_caption_and_bom(tmp_path):
    src = tmp_path / "src"
    add(src, "blank.png", noise(), " \n")
    add(src, "bom.png", noise(), "\ufeffwritten by notepad")
    report = convert_folder(src, tmp_path / "out", progress=False)
    assert report.skipped == {"empty caption": ["blank.png"]}
    (sample,) = read_samples([str(p) for p in report.shards])
    assert sample["txt"] == b"written by notepad"


def test_skips_are_logged_as_a_warning(source, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger=convert.__name__):
        convert_folder(source, tmp_path / "out", progress=False)
    assert "missing caption: 1 (e.g. no_caption.png)" in caplog.text
    assert "unreadable image: 2" in caplog.text


def test_errors_for_missing_or_empty_source(tmp_path):
    with pytest.raises(FileNotFoundError):
        convert_folder(tmp_path / "missing", tmp_path / "out", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        convert_folder(tmp_path / "empty", tmp_path / "out", progress=False)


def test_shard_urls():
    assert shard_urls("/d", "train", 1) == "/d/train-000000.tar"
    assert shard_urls("/d", "val", 12) == "/d/val-{000000..000011}.tar"


def test_cli_prints_the_pattern(source, tmp_path, capsys):
    out = tmp_path / "out"
    assert (
        convert.main([str(source), str(out), "--shard-size", "5", "--prefix", "x", "--quiet"]) == 0
    )
    printed = capsys.readouterr().out
    assert f"data.train_urls='{out}/x-{{000000..000001}}.tar'" in printed
    assert len(read_samples(f"{out}/x-{{000000..000001}}.tar")) == len(GOOD)


def test_cli_exit_code_2_on_missing_or_empty_folder(tmp_path):
    missing = subprocess.run(
        [sys.executable, "-m", "ldm_train.data.convert", str(tmp_path / "nope"), str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert missing.returncode == 2
    assert len(missing.stderr.strip().splitlines()) == 1 and "no such folder" in missing.stderr
    (tmp_path / "empty").mkdir()
    assert convert.main([str(tmp_path / "empty"), str(tmp_path / "out"), "--quiet"]) == 2


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--val-fraction", "nan", "must be a finite number > 0 and < 1"),
        ("--val-fraction", "1", "must be a finite number > 0 and < 1"),
        ("--shard-size", "0", "must be an integer from 1"),
        ("--seed", "-1", "must be an integer from 0"),
    ],
)
def test_a_bad_number_is_one_line_and_exit_code_2(source, tmp_path, capsys, option, value, message):
    with pytest.raises(SystemExit) as done:
        convert.main([str(source), str(tmp_path / "out"), option, value, "--quiet"])
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and option in err and message in err, err
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_val_fraction_holds_out_a_seeded_share_and_prints_both_keys(tmp_path, capsys):
    src = tmp_path / "src"
    for i in range(10):
        add(src, f"{i}.png", noise(seed=i), f"picture {i}")
    out = tmp_path / "out"
    reports = convert.convert_split(src, out, val_fraction=0.2, shard_size=4, progress=False)
    train, val = (read_samples([str(p) for p in reports[s].shards]) for s in ("train", "val"))
    assert (len(train), len(val)) == (8, 2)
    captions = {s["txt"] for s in train} | {s["txt"] for s in val}
    assert len(captions) == 10  # every image in exactly one split
    again = convert.convert_split(src, tmp_path / "again", 0.2, progress=False)["val"]
    assert [s["txt"] for s in read_samples([str(p) for p in again.shards])] == [
        s["txt"] for s in val
    ]  # the same seed holds out the same images
    assert convert.main([str(src), str(tmp_path / "cli"), "--val-fraction", "0.2", "--quiet"]) == 0
    printed = capsys.readouterr().out.splitlines()[-1]
    assert printed.startswith("  python -m ldm_train stage=all data=webdataset ")
    assert f"\"data.train_urls='{tmp_path / 'cli'}/train-000000.tar'\"" in printed
    assert f"\"data.val_urls='{tmp_path / 'cli'}/val-000000.tar'\"" in printed
    assert convert.main([str(src), str(tmp_path / "v"), "--prefix", "val", "--quiet"]) == 0
    assert "data.val_urls=" in capsys.readouterr().out  # a val folder converted on its own
    with pytest.raises(ValueError, match="between 0 and 1"):
        convert.convert_split(src, out, val_fraction=1.0)


def test_caption_files_and_folder_repeats(tmp_path):
    """A .caption beside an image serves when there is no .txt; a kohya folder "3_dog" writes its
    images 3 times (each its own key), only with folder_repeats."""
    src = tmp_path / "src"
    add(src, "3_dog/a.png", noise(seed=1), None)
    (src / "3_dog" / "a.caption").write_text("dog, sitting, grass")
    add(src, "other/b.png", noise(seed=2), "from the txt")
    (src / "other" / "b.caption").write_text("the txt wins")
    plain = convert_folder(src, tmp_path / "plain", progress=False)
    samples = read_samples([str(p) for p in plain.shards])
    assert sorted(s["txt"] for s in samples) == [b"dog, sitting, grass", b"from the txt"]
    repeated = convert_folder(src, tmp_path / "rep", progress=False, folder_repeats=True)
    keys = [s["__key__"] for s in read_samples([str(p) for p in repeated.shards])]
    assert repeated.written == 4 and len(set(keys)) == 4
    assert sorted(keys) == ["3_dog_a", "3_dog_a_r1", "3_dog_a_r2", "other_b"]
