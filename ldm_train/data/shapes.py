"""The embedded default dataset: procedural, captioned shapes written as WebDataset shards.

Each image shows one shape of a named colour and size at a named position on a solid background
of another colour; the caption spells out those attributes, so a small model can learn the
text-to-image mapping in minutes and its samples can be checked by eye.

    python -m ldm_train.data.shapes --out data/shapes-32 --image-size 32
    python -m ldm_train.data.shapes --out DIR --canvas 32x32 --canvas 48x32 --canvas 32x48
    python -m ldm_train.data.shapes --out DIR --shape star --n-train 40 --train-shards 1

--canvas: non-square images too (data=shapes_mixed); positions are fractions of each side and
shape sizes of the shorter side, so captions mean the same on every canvas. --shape: only these
shapes, NEW_SHAPES too (a concept to teach a trained model: README "Adapt a model with LoRA").
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import os
import random
import re
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import webdataset as wds
from PIL import Image, ImageDraw
from tqdm import tqdm

from ldm_train.data.shards import shard_paths, shard_urls

logger = logging.getLogger(__name__)

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
NEW_SHAPES: tuple[str, ...] = ("star",)  # drawable, but never in the default dataset
# Hues kept at least ~130 apart in RGB so that no two names blur together after downsampling.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "yellow": (240, 220, 40),
    "green": (40, 170, 70),
    "cyan": (40, 200, 220),
    "blue": (40, 70, 210),
    "purple": (170, 50, 200),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
}
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right", "center")

SUPERSAMPLE = 4  # draw at 4x and box-filter down: clean anti-aliased edges even at 32 px
SIZE_FRACTION = {"small": 0.30, "large": 0.55}  # bounding-box side / image side
# Jitter of the centre, as a fraction of the image side; smaller for large shapes, which have
# less room, so that "top left" and "center" never overlap.
JITTER_FRACTION = {"small": 0.05, "large": 0.02}
# Gap kept between a shape and the image border: 3% of the side, and at least 1.25 px so that
# even the anti-aliased edge never touches the outermost pixels.
BORDER_MARGIN = 0.03
BORDER_MARGIN_PX = 1.25
# Fixed tar mtime: makes the shards byte-identical across runs, not just their contents.
TAR_MTIME = 0
PARAMS_FILE = "shapes.json"  # the settings a folder was made with, to flag a stale dataset


def sample_attributes(rng: random.Random, shapes: Sequence[str] = SHAPES) -> dict:
    """Draw one attribute dict; the background colour always differs from the shape colour."""
    colour = rng.choice(list(COLOURS))
    return {
        "shape": rng.choice(shapes),
        "colour": colour,
        "size": rng.choice(SIZES),
        "position": rng.choice(POSITIONS),
        "background": rng.choice([name for name in COLOURS if name != colour]),
        # Unit jitter in [-1, 1], rounded so that the json round-trips exactly.
        "jitter": [round(rng.uniform(-1.0, 1.0), 3), round(rng.uniform(-1.0, 1.0), 3)],
    }


def caption(attrs: dict) -> str:
    """E.g. "a small red circle at the top left on a blue background"."""
    position = attrs["position"]
    where = "in the center" if position == "center" else f"at the {position}"
    return (
        f"a {attrs['size']} {attrs['colour']} {attrs['shape']} {where}"
        f" on a {attrs['background']} background"
    )


def _axis_centre(anchor: str, jitter: float, half_extent: float, size: str, margin: float) -> float:
    """Centre coordinate along one axis, as a fraction of the image side.

    anchor is "low", "mid" or "high"; the result keeps the whole shape inside the margin.
    """
    amplitude = JITTER_FRACTION[size]
    lowest = half_extent + margin
    if anchor == "mid":
        nominal = 0.5
    else:
        # Quadrant centre, pushed inward when the shape is too large to sit there with jitter.
        nominal = max(0.25, lowest + amplitude)
        nominal = nominal if anchor == "low" else 1.0 - nominal
    return min(max(nominal + amplitude * jitter, lowest), 1.0 - lowest)


def shape_centre(attrs: dict, width: int, height: int | None = None) -> tuple[float, float]:
    """(x, y) centre of the shape as fractions of the image's width and height (default: square)."""
    height = width if height is None else height
    position = attrs["position"]
    vertical, _, horizontal = position.partition(" ")
    x_anchor = {"left": "low", "right": "high"}.get(horizontal, "mid")
    y_anchor = {"top": "low", "bottom": "high"}.get(vertical, "mid")
    jitter_x, jitter_y = attrs.get("jitter", (0.0, 0.0))
    centre = []
    for anchor, jitter, side in ((x_anchor, jitter_x, width), (y_anchor, jitter_y, height)):
        # The shape's size is a fraction of the shorter side: its half extent along this axis.
        half_extent = SIZE_FRACTION[attrs["size"]] / 2 * (min(width, height) / side)
        margin = max(BORDER_MARGIN, BORDER_MARGIN_PX / side)
        centre.append(_axis_centre(anchor, jitter, half_extent, attrs["size"], margin))
    return centre[0], centre[1]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, half: float, fill):
    if shape == "circle":
        draw.ellipse((cx - half, cy - half, cx + half, cy + half), fill=fill)
    elif shape == "square":
        side = 0.85 * half  # a bit smaller than the circle so both look about as heavy
        draw.rectangle((cx - side, cy - side, cx + side, cy + side), fill=fill)
    elif shape == "triangle":
        draw.polygon(
            [(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)],
            fill=fill,
        )
    elif shape == "cross":
        arm = half / 3  # thick arms: a thin plus sign melts into a blob at 32 px
        draw.rectangle((cx - half, cy - arm, cx + half, cy + arm), fill=fill)
        draw.rectangle((cx - arm, cy - half, cx + arm, cy + half), fill=fill)
    elif shape == "star":  # five points up; a wide core, so that small stars stay stars at 32 px
        tips = [(half * (0.5 if k % 2 else 1.0), math.pi * (k / 5 - 0.5)) for k in range(10)]
        draw.polygon([(cx + r * math.cos(a), cy + r * math.sin(a)) for r, a in tips], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES + NEW_SHAPES}")


def render(attrs: dict, image_size: int, height: int | None = None) -> Image.Image:
    """RGB image of one attribute dict: image_size x image_size, or image_size wide and `height`
    tall."""
    width, height = image_size, image_size if height is None else height
    canvas = (width * SUPERSAMPLE, height * SUPERSAMPLE)
    image = Image.new("RGB", canvas, COLOURS[attrs["background"]])
    centre_x, centre_y = shape_centre(attrs, width, height)
    _draw_shape(
        ImageDraw.Draw(image),
        attrs["shape"],
        centre_x * canvas[0],
        centre_y * canvas[1],
        SIZE_FRACTION[attrs["size"]] * min(canvas) / 2,
        COLOURS[attrs["colour"]],
    )
    return image.reduce(SUPERSAMPLE)  # box filter: exact area average, no ringing


def _encode_sample(key: str, attrs: dict, image_size: int) -> dict:
    """attrs["canvas"] ([width, height]), when present, sets the image's size."""
    buffer = io.BytesIO()
    render(attrs, *attrs.get("canvas", (image_size,))).save(buffer, format="PNG")
    text = caption(attrs)
    return {
        "__key__": key,
        "png": buffer.getvalue(),
        "txt": text.encode("utf-8"),
        "json": json.dumps({**attrs, "caption": text}, sort_keys=True).encode("utf-8"),
    }


def shards_exist(out_dir: str | Path, train_shards: int, val_shards: int) -> bool:
    """True when out_dir holds every train and val shard."""
    paths = shard_paths(out_dir, "train", train_shards) + shard_paths(out_dir, "val", val_shards)
    return all(path.is_file() for path in paths)


def _split_rng(seed: int, split: str) -> random.Random:
    # A string seed is hashed with SHA-512: stable across runs and Python processes, and
    # train and val get unrelated streams for every seed.
    return random.Random(f"ldm_train.shapes/{split}/{seed}")


def _check_counts(split: str, num_samples: int, num_shards: int) -> None:
    if num_shards < 1 or num_samples < num_shards:
        raise ValueError(
            f"{split}: need at least one shard and one sample per shard, "
            f"got {num_samples} samples for {num_shards} shards"
        )


def _write_split(
    directory: Path,
    split: str,
    num_samples: int,
    num_shards: int,
    image_size: int,
    seed: int,
    progress_bar: tqdm,
    canvases: Sequence[Sequence[int]] | None = None,
    shapes: Sequence[str] = SHAPES,
) -> None:
    # One attribute stream per split, cut into shards afterwards: the samples do not depend on
    # the number of shards. Canvases come from a stream of their own: the attributes (and the
    # square dataset's bytes) stay the same with or without them.
    rng = _split_rng(seed, split)
    canvas_rng = random.Random(f"ldm_train.shapes/{split}/{seed}/canvas")
    bounds = [index * num_samples // num_shards for index in range(num_shards + 1)]
    paths = shard_paths(directory, split, num_shards)
    for path, start, end in zip(paths, bounds[:-1], bounds[1:], strict=True):
        with wds.TarWriter(str(path), mtime=TAR_MTIME) as writer:
            for index in range(start, end):
                attrs = sample_attributes(rng, shapes)
                if canvases:
                    attrs["canvas"] = list(canvas_rng.choice(canvases))
                writer.write(_encode_sample(f"{split}-{index:08d}", attrs, image_size))
                progress_bar.update()


def _warn_if_params_differ(out_dir: Path, params: dict) -> None:
    """Existing shards win; say so when they were made with other settings (e.g. image size)."""
    try:
        written = json.loads((out_dir / PARAMS_FILE).read_text())
    except (OSError, ValueError):
        return  # made by hand or by an older version: nothing to compare
    if written != params:
        logger.warning(
            "%s holds a shapes dataset made with %s, not %s; using it as it is "
            "(delete the folder to make it again)",
            out_dir,
            written,
            params,
        )


def _publish(tmp_dir: Path, out_dir: Path, train_shards: int, val_shards: int) -> None:
    """Move the finished tmp_dir to out_dir in one rename, so no reader sees half a dataset."""
    try:
        os.replace(tmp_dir, out_dir)  # also succeeds when out_dir is an empty folder
        return
    except OSError:
        if not out_dir.is_dir():
            raise
    if shards_exist(out_dir, train_shards, val_shards):
        logger.info("another process wrote %s first; keeping its shards", out_dir)
        return
    # out_dir holds something else, e.g. a partial copy: replace the shards one by one.
    logger.warning("%s already holds files; overwriting its shards one by one", out_dir)
    for path in sorted(tmp_dir.iterdir()):
        os.replace(path, out_dir / path.name)


def _params(image_size, n_train, n_val, seed, canvases, shapes) -> dict:
    """What a dataset was made with (params.json): the same params give the same shards."""
    params = {"image_size": image_size, "n_train": n_train, "n_val": n_val, "seed": seed}
    if canvases:
        params["canvases"] = [[int(side) for side in canvas] for canvas in canvases]
    if shapes:  # unknown ones: _draw_shape's ValueError
        params["shapes"] = list(shapes)
    return params


def make_shapes_dataset(
    out_dir: str | Path,
    image_size: int = 32,
    n_train: int = 20000,
    n_val: int = 512,
    train_shards: int = 16,
    val_shards: int = 4,
    seed: int = 0,
    progress: bool = True,
    canvases: Sequence[Sequence[int]] | None = None,
    shapes: Sequence[str] | None = None,
) -> Path:
    """Write the shapes dataset into out_dir (train-*.tar, val-*.tar) unless it is already there.

    Same arguments give byte-identical shards. Writing goes to a sibling temporary folder that
    is renamed into place at the end, so an interrupted or concurrent run never leaves a partial
    dataset under out_dir. canvases: [width, height] sizes each sample draws one of (uniformly);
    None: every image image_size square. shapes: the ones drawn (None: SHAPES; NEW_SHAPES too).
    """
    out_dir = Path(out_dir)
    params = _params(image_size, n_train, n_val, seed, canvases, shapes)
    canvases = params.get("canvases")
    if shards_exist(out_dir, train_shards, val_shards):
        logger.info("shapes dataset already in %s", out_dir)
        _warn_if_params_differ(out_dir, params)
        return out_dir
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    _check_counts("train", n_train, train_shards)
    _check_counts("val", n_val, val_shards)

    logger.info("writing shapes dataset %s to %s", params, out_dir)
    # abspath, not resolve: a symlinked out_dir stays a link, and "." still has a name.
    absolute = Path(os.path.abspath(out_dir))
    tmp_dir = absolute.with_name(f"{absolute.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp_dir, ignore_errors=True)  # left by a killed run that had our pid
    tmp_dir.mkdir(parents=True)
    try:
        with tqdm(total=n_train + n_val, desc="shapes", unit="img", disable=not progress) as bar:
            for split, n, shards in (("train", n_train, train_shards), ("val", n_val, val_shards)):
                drawn = tuple(shapes or SHAPES)
                _write_split(tmp_dir, split, n, shards, image_size, seed, bar, canvases, drawn)
        (tmp_dir / PARAMS_FILE).write_text(json.dumps(params, sort_keys=True) + "\n")
        _publish(tmp_dir, out_dir, train_shards, val_shards)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return out_dir


def parse_canvas(text: str) -> list[int]:
    if not re.fullmatch(r"\d+x\d+", text):
        raise argparse.ArgumentTypeError(f"{text!r}: write WIDTHxHEIGHT, e.g. 48x32")
    return [int(side) for side in text.split("x")]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ldm_train.data.shapes",
        description="Write the procedural shapes dataset as WebDataset shards.",
    )
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--n-train", type=int, default=20000)
    parser.add_argument("--n-val", type=int, default=512)
    parser.add_argument("--train-shards", type=int, default=16)
    parser.add_argument("--val-shards", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--canvas", action="append", type=parse_canvas, help="WxH (repeat)")
    choices = SHAPES + NEW_SHAPES
    parser.add_argument("--shape", action="append", choices=choices, help="only these (repeat)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out_dir = make_shapes_dataset(
        args.out,
        image_size=args.image_size,
        n_train=args.n_train,
        n_val=args.n_val,
        train_shards=args.train_shards,
        val_shards=args.val_shards,
        seed=args.seed,
        progress=not args.quiet,
        canvases=args.canvas,
        shapes=args.shape,
    )
    train_urls = shard_urls(out_dir, "train", args.train_shards)
    val_urls = shard_urls(out_dir, "val", args.val_shards)
    print(f"shapes dataset in {out_dir}: train {train_urls}, val {val_urls}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
