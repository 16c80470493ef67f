"""What one file of a folder of captioned images becomes in a WebDataset sample: which files are
images, the caption beside each (.txt, else .caption), the image's bytes (kept as they are, or
re-encoded as 8-bit PNG) and a unique key. ldm_train.data.convert writes the shards."""

from __future__ import annotations

import io
import logging
import re
from pathlib import Path

import numpy as np
from PIL import Image

logger = logging.getLogger("ldm_train.data.convert")

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
CAPTION_SUFFIXES = (".txt", ".caption")


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
    """The caption beside the image: its .txt, else its .caption (kohya's and others' names)."""
    found = [image_path.with_suffix(s) for s in CAPTION_SUFFIXES]
    caption_path = next((path for path in found if path.is_file()), None)
    if caption_path is None:
        raise SkipSample(SKIP_MISSING_CAPTION)
    try:
        raw = caption_path.read_bytes()
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


def unique_key(relative_path: str, used: set[str]) -> str:
    key = _sanitise_key(relative_path)
    if key in used:  # e.g. cat.jpg next to cat.png
        key = _sanitise_key(relative_path.replace(".", "_"))
    base, counter = key, 1
    while key in used:
        key, counter = f"{base}_{counter}", counter + 1
    used.add(key)
    return key
