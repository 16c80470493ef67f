"""Convert a folder of images with same-name .txt captions into WebDataset shards.

    photos/cat1.jpg + photos/cat1.txt  ->  OUT/train-000000.tar: cat1.jpg, cat1.txt, cat1.json

    python -m ldm_train.data.convert photos/ data/photos --shard-size 1000

Folders are searched recursively; hidden files and folders (".DS_Store", "._x.jpg") are ignored.
Files that cannot be used are skipped and reported, never fatal.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image
from tqdm import tqdm

from ldm_train.data.shards import shard_glob, shard_urls, shard_writer_pattern

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tiff", ".tif"})
# Formats stored byte for byte, under the sample key that names them.
KEPT_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
# Modes every decoder turns into correct RGB; others (16-bit, float) are rescaled to 8 bit,
# because PIL's convert("RGB") clips them and a 16-bit photo comes out nearly white.
EIGHT_BIT_MODES = frozenset({"1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr"})
PNG_SAFE_MODES = frozenset({"1", "L", "LA", "P", "RGB", "RGBA"})

SKIP_UNREADABLE_IMAGE = "unreadable image"
SKIP_MISSING_CAPTION = "missing caption"
SKIP_CAPTION_NOT_UTF8 = "caption not UTF-8"
SKIP_EMPTY_CAPTION = "empty caption"
SKIP_UNREADABLE_CAPTION = "unreadable caption"
PATHS_SHOWN_PER_REASON = 5


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


class SkipSample(Exception):
    """A file that cannot become a sample; the message is the reason reported."""


def find_images(src: Path) -> list[Path]:
    """Image files under src, recursively, in a deterministic (sorted) order."""
    images = [
        path
        for path in src.rglob("*")
        if path.suffix.lower() in IMAGE_EXTENSIONS
        and path.is_file()
        and not any(part.startswith(".") for part in path.relative_to(src).parts)
    ]
    return sorted(images, key=lambda path: path.relative_to(src).as_posix())


def read_caption(image_path: Path) -> str:
    caption_path = image_path.with_suffix(".txt")
    try:
        raw = caption_path.read_bytes()
    except FileNotFoundError:
        raise SkipSample(SKIP_MISSING_CAPTION) from None
    except OSError:
        raise SkipSample(SKIP_UNREADABLE_CAPTION) from None
    try:
        text = raw.decode("utf-8-sig")  # -sig: tolerate the BOM some Windows editors write
    except UnicodeDecodeError:
        raise SkipSample(SKIP_CAPTION_NOT_UTF8) from None
    text = text.strip()
    if not text:
        raise SkipSample(SKIP_EMPTY_CAPTION)
    return text


def _to_eight_bit(image: Image.Image) -> Image.Image:
    """Rescale a 16/32-bit integer or float image to 8-bit L (PIL's convert would clip it)."""
    values = np.asarray(image, dtype=np.float64)
    peak = 65535.0  # integer modes hold 16-bit samples
    if image.mode == "F":  # floats: 0..1 when they fit, else 0..255
        peak = 1.0 if values.max(initial=0.0) <= 1.0 else 255.0
    return Image.fromarray(np.clip(values * (255.0 / peak), 0, 255).round().astype(np.uint8))


def _png_bytes(image: Image.Image) -> bytes:
    if image.mode not in EIGHT_BIT_MODES:
        image = _to_eight_bit(image)
    if image.mode not in PNG_SAFE_MODES:
        has_alpha = image.mode.endswith("A") or "transparency" in image.info
        image = image.convert("RGBA" if has_alpha else "RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def encode_image(path: Path) -> tuple[str, bytes]:
    """(sample key extension, bytes) for one image file; raises SkipSample if it is unusable.

    JPEG, PNG and WebP keep their original bytes, keyed by the format PIL detects (so a PNG
    misnamed .jpg is still stored as png); other formats, and high-bit-depth images that loaders
    would decode wrongly, are re-encoded as 8-bit PNG.
    """
    try:
        raw = path.read_bytes()
        with Image.open(io.BytesIO(raw)) as image:
            image.load()  # decodes fully: catches truncated and corrupt files, not just headers
            extension = KEPT_FORMATS.get(image.format or "")
            if extension and image.mode in EIGHT_BIT_MODES:
                return extension, raw
            return "png", _png_bytes(image)
    except Exception as error:  # PIL raises many types (OSError, SyntaxError, DecompressionBomb…)
        logger.debug("cannot read %s: %s", path, error)
        raise SkipSample(SKIP_UNREADABLE_IMAGE) from None


def _sanitise_key(relative_path: str) -> str:
    stem = relative_path.rsplit(".", 1)[0]
    # WebDataset splits key and extension at the first dot, and "/" would become a folder.
    return re.sub(r"[./\\]", "_", stem)


def _unique_key(relative_path: str, used: set[str]) -> str:
    key = _sanitise_key(relative_path)
    if key in used:  # e.g. cat.jpg next to cat.png
        key = _sanitise_key(relative_path.replace(".", "_"))
    base, counter = key, 1
    while key in used:
        key, counter = f"{base}_{counter}", counter + 1
    used.add(key)
    return key


def convert_folder(
    src: str | Path,
    out_dir: str | Path,
    shard_size: int = 1000,
    prefix: str = "train",
    progress: bool = True,
) -> ConvertReport:
    """Write every captioned image under src into {out_dir}/{prefix}-NNNNNN.tar shards.

    Raises FileNotFoundError if src is not a folder or holds no images.
    """
    src, out_dir = Path(src), Path(out_dir)
    if not src.is_dir():
        raise FileNotFoundError(f"no such folder: {src}")
    if shard_size < 1:
        raise ValueError(f"shard_size must be positive, got {shard_size}")
    images = find_images(src)
    if not images:
        extensions = ", ".join(sorted(IMAGE_EXTENSIONS))
        raise FileNotFoundError(f"no images ({extensions}) under {src}")

    report, used_keys, writer = ConvertReport(), set(), None
    try:
        for path in tqdm(images, desc="convert", unit="img", disable=not progress):
            relative = path.relative_to(src).as_posix()
            try:
                record = _record(path, relative, used_keys)
            except SkipSample as skip:
                report.skip(str(skip), relative)
                continue
            if writer is None:  # opened lazily: ShardWriter creates a shard file at once
                writer = _shard_writer(out_dir, prefix, shard_size, report)
            writer.write(record)
            report.written += 1
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
        "__key__": _unique_key(relative, used_keys),
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ldm_train.data.convert",
        description="Convert a folder of images with same-name .txt captions to WebDataset shards.",
    )
    parser.add_argument("src", type=Path, help="folder of images and .txt captions (recursive)")
    parser.add_argument("out", type=Path, help="output folder for the shards")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    parser.add_argument("--prefix", default="train", help="shard name prefix (train, val, ...)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        report = convert_folder(
            args.src, args.out, args.shard_size, args.prefix, progress=not args.quiet
        )
    except (FileNotFoundError, ValueError) as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    if not report.written:
        print(f"{parser.prog}: error: no usable image under {args.src}", file=sys.stderr)
        return 1
    print(f"wrote {report.written} samples, skipped {report.num_skipped}")
    pattern = shard_urls(args.out, args.prefix, len(report.shards))
    print(f"data.train_urls='{pattern}'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
