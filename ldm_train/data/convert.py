"""Convert a folder of images with same-name .txt (or .caption) captions into WebDataset shards.

    photos/cat1.jpg + photos/cat1.txt  ->  OUT/train-000000.tar: cat1.jpg, cat1.txt, cat1.json

    python -m ldm_train.data.convert photos/ data/photos --val-fraction 0.05

Folders are searched recursively; hidden files and folders (".DS_Store", "._x.jpg") are ignored.
Files that cannot be used are skipped and reported, never fatal. --val-fraction holds out a seeded
share of the images as OUT/val-*.tar; --folder-repeats writes the images of a folder named
"<N>_<name>" (kohya's convention, e.g. 10_mydog/) N times into the training shards. The last lines
printed are the overrides to train with.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import webdataset as wds
from tqdm import tqdm

from ldm_train.data.folder_samples import (
    IMAGE_EXTENSIONS,
    SkipSample,
    encode_image,
    find_images,
    read_caption,
    unique_key,
)
from ldm_train.data.shards import shard_glob, shard_urls, shard_writer_pattern
from ldm_train.rules import SEED, Int, Parser, Real, typed

logger = logging.getLogger(__name__)
PROG = "python -m ldm_train.data.convert"

PATHS_SHOWN_PER_REASON = 5
REPEATS_FOLDER = re.compile(r"^(\d+)_.")  # kohya's "10_name": the folder's images 10 times


@dataclass
class ConvertReport:
    written: int = 0
    skipped: dict[str, list[str]] = field(default_factory=dict)  # reason -> relative paths
    shards: list[Path] = field(default_factory=list)

    def skip(self, reason: str, relative_path: str) -> None:
        self.skipped.setdefault(reason, []).append(relative_path)

    @property
    def num_skipped(self) -> int:
        return sum(len(paths) for paths in self.skipped.values())


def convert_folder(
    src: str | Path,
    out_dir: str | Path,
    shard_size: int = 1000,
    prefix: str = "train",
    progress: bool = True,
    folder_repeats: bool = False,
) -> ConvertReport:
    """Write every captioned image under src into {out_dir}/{prefix}-NNNNNN.tar shards (the
    images of "<N>_name" folders N times, with folder_repeats).

    Raises FileNotFoundError if src is not a folder or holds no images.
    """
    src, out_dir = Path(src), Path(out_dir)
    images = source_images(src, shard_size)
    return write_shards(images, src, out_dir, prefix, shard_size, progress, folder_repeats)


def convert_split(
    src: str | Path,
    out_dir: str | Path,
    val_fraction: float,
    shard_size: int = 1000,
    seed: int = 0,
    progress: bool = True,
    folder_repeats: bool = False,
) -> dict[str, ConvertReport]:
    """convert_folder into train-*.tar and val-*.tar: a seeded val_fraction of the images (at
    least one) held out for validation, never repeated. {"train": report, "val": report}."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    src, out_dir = Path(src), Path(out_dir)
    images = source_images(src, shard_size)
    if len(images) < 2:
        raise ValueError(f"{src} holds {len(images)} image: too few to hold out a validation share")
    order = list(range(len(images)))
    random.Random(seed).shuffle(order)
    held = set(order[: max(1, round(val_fraction * len(images)))])
    split = {
        "train": [image for i, image in enumerate(images) if i not in held],
        "val": [image for i, image in enumerate(images) if i in held],
    }
    return {
        name: write_shards(
            chosen, src, out_dir, name, shard_size, progress, folder_repeats and name == "train"
        )
        for name, chosen in split.items()
    }


def source_images(src: Path, shard_size: int) -> list[Path]:
    if not src.is_dir():
        raise FileNotFoundError(f"no such folder: {src}")
    if shard_size < 1:
        raise ValueError(f"shard_size must be positive, got {shard_size}")
    images = find_images(src)
    if not images:
        extensions = ", ".join(sorted(IMAGE_EXTENSIONS))
        raise FileNotFoundError(f"no images ({extensions}) under {src}")
    return images


def repeats_of(relative: Path) -> int:
    """N for an image inside a folder named "<N>_name" (the nearest such folder), else 1."""
    for folder in reversed(relative.parent.parts):
        if match := REPEATS_FOLDER.match(folder):
            return max(1, int(match.group(1)))
    return 1


def write_shards(
    images: list[Path],
    src: Path,
    out_dir: Path,
    prefix: str,
    shard_size: int,
    progress: bool,
    folder_repeats: bool,
) -> ConvertReport:
    report, used_keys, writer = ConvertReport(), set(), None
    try:
        for path in tqdm(images, desc=f"convert {prefix}", unit="img", disable=not progress):
            relative = path.relative_to(src).as_posix()
            try:
                record = _record(path, relative, used_keys)
            except SkipSample as skip:
                report.skip(str(skip), relative)
                continue
            if writer is None:  # opened lazily: ShardWriter creates a shard file at once
                writer = _shard_writer(out_dir, prefix, shard_size, report)
            copies = repeats_of(path.relative_to(src)) if folder_repeats else 1
            for copy in range(copies):  # each copy its own key: the loader sees N samples
                writer.write(
                    record if copy == 0 else {**record, "__key__": f"{record['__key__']}_r{copy}"}
                )
            report.written += copies
    finally:
        if writer is not None:
            writer.close()
    _log_summary(report, out_dir, prefix)
    return report


def _record(path: Path, relative: str, used_keys: set[str]) -> dict:
    """One sample: the image as it is (or re-encoded), its caption and a json with its source."""
    text = read_caption(path)
    extension, image_bytes = encode_image(path)
    return {
        "__key__": unique_key(relative, used_keys),
        extension: image_bytes,
        "txt": text.encode("utf-8"),
        "json": json.dumps({"source": relative, "caption": text}).encode("utf-8"),
    }


def _shard_writer(out_dir: Path, prefix: str, shard_size: int, report: ConvertReport):
    out_dir.mkdir(parents=True, exist_ok=True)
    return wds.ShardWriter(
        shard_writer_pattern(out_dir, prefix),
        maxcount=shard_size,
        verbose=0,
        format="PAX_FORMAT",  # ustar caps names at 100 bytes; deep paths make long keys
        post=lambda name: report.shards.append(Path(name)),
    )


def _log_summary(report: ConvertReport, out_dir: Path, prefix: str) -> None:
    logger.info(
        "wrote %d samples into %d shards in %s (%d skipped)",
        report.written,
        len(report.shards),
        out_dir,
        report.num_skipped,
    )
    if report.skipped:
        details = "; ".join(
            f"{reason}: {len(paths)} (e.g. {', '.join(paths[:PATHS_SHOWN_PER_REASON])})"
            for reason, paths in sorted(report.skipped.items())
        )
        logger.warning("skipped %d files: %s", report.num_skipped, details)
    stale = sorted(set(out_dir.glob(shard_glob(prefix))) - set(report.shards))
    if stale:
        logger.warning(
            "%s also holds %d older %s-*.tar shards that this run did not write (e.g. %s)",
            out_dir,
            len(stale),
            prefix,
            stale[0].name,
        )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = Parser(
        PROG,
        "Convert a folder of images with same-name .txt (or .caption) captions to WebDataset "
        "shards.",
    )
    parser.add_argument("src", type=Path, help="folder of images and captions (recursive)")
    parser.add_argument("out", type=Path, help="output folder for the shards")
    parser.add_argument(
        "--shard-size", type=typed(Int(1, 10**9)), default=1000, help="samples per shard"
    )
    parser.add_argument("--prefix", default="train", help="shard name prefix (train, val, ...)")
    parser.add_argument(
        "--val-fraction",
        type=typed(Real(0, 1, low_open=True, high_open=True)),
        help="hold out this share of the images as val-*.tar (e.g. 0.05); --prefix is then unused",
    )
    parser.add_argument(
        "--seed", type=typed(SEED), default=0, help="which images --val-fraction holds out"
    )
    parser.add_argument(
        "--folder-repeats",
        action="store_true",
        help='write the images of a folder named "<N>_name" N times (kohya\'s repeats)',
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def convert(args: argparse.Namespace) -> dict[str, ConvertReport]:
    """The shards of args.src: one split (args.prefix), or train and val (--val-fraction)."""
    bar, repeats = not args.quiet, args.folder_repeats
    if args.val_fraction is not None:
        return convert_split(
            args.src, args.out, args.val_fraction, args.shard_size, args.seed, bar, repeats
        )
    shards = convert_folder(args.src, args.out, args.shard_size, args.prefix, bar, repeats)
    return {args.prefix: shards}


def print_result(reports: dict[str, ConvertReport], out: Path) -> None:
    """What was written, and the keys (or the whole command) that train on it."""
    for prefix, report in reports.items():
        print(f"{prefix}: wrote {report.written} samples, skipped {report.num_skipped}")
    urls = {
        "data.val_urls" if prefix == "val" else "data.train_urls": shard_urls(
            out, prefix, len(report.shards)
        )
        for prefix, report in reports.items()
        if report.shards
    }
    overrides = " ".join(f"\"{key}='{pattern}'\"" for key, pattern in urls.items())
    if len(urls) == 2:
        print(f"train on them with:\n  python -m ldm_train stage=all data=webdataset {overrides}")
    else:
        print(overrides)
        if "data.train_urls" in urls:
            print("(no validation shards: --val-fraction 0.05 holds out a share)")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        reports = convert(args)
    except (FileNotFoundError, ValueError) as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    if not any(report.written for report in reports.values()):
        print(f"{PROG}: error: no usable image under {args.src}", file=sys.stderr)
        return 1
    print_result(reports, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
