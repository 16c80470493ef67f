"""One sample of the loader: its options (LoaderConfig), what is skipped and why (StreamStats),
raw tar members decoded into an image and a caption (or a cached latent), and batches of them.
Bad data is skipped and counted, never a crash; a user's mistake is a one-line LoaderUserError.

Shards written by `python -m ldm_train.cache_latents` hold the frozen VAE's posterior instead of an
image (and the text encoder's hidden states): their batches carry "latent" (B x 2C x h x w, the
encoder's moments, mean and log-variance) and "text" (B x L x D) instead of "image"; the flip is
picked with the same per-sample draw as an image's (the cache holds both flips when flips are on).
"""

from __future__ import annotations

import io
import json
import logging
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.transforms import v2

from ldm_train.data.bucket_sizes import BucketTransform, Size, bucket_sizes, to_tensor
from ldm_train.data.captions import shuffle_tags
from ldm_train.errors import UserError

log = logging.getLogger(__name__)

MAX_WARNINGS_PER_REASON = 5
MAX_RESIZED_PIXELS = (
    4096 * 4096
)  # an image whose resize would hold more is skipped (too_many_pixels)
# Members of a cached-latent sample (ldm_train.cache_latents writes them; .npy: numpy's format).
LATENT_KEY, LATENT_FLIP_KEY, TEXT_KEY = "latent.npy", "latent_flip.npy", "text.npy"


class LoaderUserError(UserError):
    """A user's mistake found while reading (bad shards or options), often in a DataLoader worker:
    torch re-raises it in the main process as the same type with the message "Caught ... in
    DataLoader worker process N. Original Traceback ... <type>: <message>". The one line that
    names the problem is kept; the worker's traceback is noise to the user."""

    def __init__(self, message: str) -> None:
        if "\nOriginal Traceback" in message:
            last = message.rstrip().splitlines()[-1]
            message = last.split(f"{type(self).__name__}: ", 1)[-1]
        super().__init__(message)


class NoValidSamplesError(LoaderUserError):
    """A whole pass over the shards gave no usable sample."""


@dataclass
class LoaderConfig:
    """The loader's options (the `data.*` keys other than urls, name and the dataset maker)."""

    image_size: int = 256
    batch_size: int = 32
    val_batch_size: int | None = None
    num_workers: int = 2
    shuffle_buffer: int = 1000
    seed: int = 0
    image_keys: Sequence[str] = ("jpg", "jpeg", "png", "webp")
    caption_keys: Sequence[str] = ("txt", "caption", "text")
    random_flip: bool = True
    crop: Literal["center", "random"] = "center"
    batches_per_epoch: int = 1000
    # Aspect-ratio buckets (ldm_train/data/bucket_sizes.py, bucket_batches.py); both None: square images.
    buckets: Sequence[Sequence[int]] | None = None  # [width, height] pairs
    bucket_max_ratio: float | None = None  # or: made from image_size up to this long/short ratio
    bucket_step: int = 8  # their sides' step: the VAE's downsampling factor (or a multiple)
    bucket_cap: int | None = None  # samples held over all buckets; None: batch_size - 1 each
    # Comma-separated tag captions: None as written; N: shuffled at each draw, the first N kept.
    shuffle_tags: int | None = None

    @property
    def bucketed(self) -> bool:
        return self.buckets is not None or self.bucket_max_ratio is not None

    @property
    def bucket_list(self) -> list[Size] | None:
        return bucket_sizes(self.buckets, self.bucket_max_ratio, self.image_size, self.bucket_step)


@dataclass
class StreamStats:
    """Per-worker counts of what went through and what was skipped, and why."""

    read: int = 0  # samples read from the tars (before the split, shuffle and decoding)
    ok: int = 0  # samples decoded into a usable image and caption
    skipped: Counter = field(default_factory=Counter)
    replaying: bool = False  # re-reading what a resumed run already counted
    quiet: bool = False  # count without warning (a check whose error lists the counts)
    _reported: int = 0

    def skip(self, reason: str, where: str, error: BaseException | None = None) -> None:
        if self.replaying:
            return
        self.skipped[reason] += 1
        if self.skipped[reason] <= MAX_WARNINGS_PER_REASON and not self.quiet:
            detail = f": {type(error).__name__}: {error}" if error is not None else ""
            more = (
                " (further ones counted, not shown)"
                if self.skipped[reason] == MAX_WARNINGS_PER_REASON
                else ""
            )
            log.warning("skipped (%s) %s%s%s", reason, where, detail, more)

    def shard_error(self, error: BaseException) -> bool:
        """webdataset handler for unreadable or corrupt shards: count, warn, go on."""
        self.skip("unreadable shard", "a shard", error)  # webdataset puts the url into the error
        return True

    def take_new_skips(self) -> int:
        total = sum(self.skipped.values())
        new, self._reported = total - self._reported, total
        return new

    def state_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "skipped": dict(self.skipped), "reported": self._reported}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ok, self.skipped = state["ok"], Counter(state["skipped"])
        self._reported = state["reported"]


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB; transparency is composited on white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # PIL's convert("RGB") clips high-bit-depth greys instead of scaling them.
        array = np.asarray(image, dtype=np.float64)
        peak = float(array.max()) if array.size else 0.0
        # The bit depth the values fit, not their own maximum (a dark image must stay dark).
        top = next((t for t in (255.0, 65535.0) if peak <= t), peak)
        if image.mode.startswith("I;16"):
            top = 65535.0
        image = Image.fromarray(np.clip(array / top * 255.0, 0, 255).astype(np.uint8), "L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("RGB")


class ImageTransform:
    """PIL RGB image -> C x H x W float tensor in [-1, 1]: shorter side to image_size (small images
    are upscaled), centre crop unless training with random crops (see augment).

    What v2.Compose([Resize, CenterCrop, ToImage, ToDtype(scale=True), Normalize(0.5, 0.5)]) does,
    written out because on small images those transforms' per-call overhead costs twice the PNG
    decode itself (790 vs 250 us per 32 px image here): resize and crop run only when the size asks
    for them, and the conversion is one numpy view and one in-place scale.
    """

    def __init__(self, cfg: LoaderConfig, train: bool):
        self.size = cfg.image_size
        self.draft_size = (self.size, self.size)
        self.resize = v2.Resize(self.size, antialias=True)
        self.crop = None if (train and cfg.crop == "random") else v2.CenterCrop(self.size)

    def __call__(self, image: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        if min(image.size) != self.size:
            image = self.resize(image)
        if self.crop is not None and image.size != (self.size, self.size):
            image = self.crop(image)
        return to_tensor(image)  # a random crop is augment's


def too_many_pixels(size: tuple[int, int], square: tuple[int, int]) -> bool:
    """Bounded memory for images of any shape: more pixels than PIL's decompression-bomb limit,
    or a resize (the short side to the square's, keeping the ratio; what the transforms do, an
    upper bound for buckets) of more than MAX_RESIZED_PIXELS. A 1 x 600000 px image resized to 32
    px would hold 614 M pixels (about 3 GB as the loader handles it)."""
    width, height = size
    if width * height > (Image.MAX_IMAGE_PIXELS or MAX_RESIZED_PIXELS):
        return True
    scale = max(square) / max(1, min(width, height))
    return width * height * scale**2 > MAX_RESIZED_PIXELS


def image_transform(cfg: LoaderConfig, train: bool) -> ImageTransform | BucketTransform:
    """Square images, or with buckets each image at its bucket's size (ldm_train/data/bucket_sizes.py)."""
    buckets = cfg.bucket_list
    if buckets is None:
        return ImageTransform(cfg, train)
    return BucketTransform(buckets, random_crop=train and cfg.crop == "random")


def read_meta(sample: dict) -> dict:
    """The sample's json as a dict; {} when absent or unreadable (metadata is optional)."""
    try:
        meta = json.loads(sample["json"]) if "json" in sample else {}
    except ValueError:
        return {}
    return meta if isinstance(meta, dict) else {}


def read_caption(sample: dict, caption_keys: Sequence[str], meta: dict) -> str | None:
    """The first caption key present (bytes -> UTF-8), else the json's "caption"; None if neither."""
    for key in caption_keys:
        if key in sample:
            return sample[key].decode("utf-8").strip()
    caption = meta.get("caption")
    return caption.strip() if isinstance(caption, str) else None


def decode_sample(
    sample: dict,
    cfg: LoaderConfig,
    transform: ImageTransform | BucketTransform,
    stats: StreamStats,
    rng: random.Random | None = None,
) -> dict | None:
    """Raw tar members -> {"image", "caption", "key", "meta"}, or None (skipped and counted).

    Decoding by hand rather than with wds.decode: we need one image out of several candidate keys,
    every PIL mode made RGB, and a count per reason for what is skipped. rng (training only) draws
    the random crop and flip. Whatever one sample raises (e.g. RecursionError from a json nested
    too deep) skips it, counted under the exception's name: bad data is never a crash. A
    UserError (options that cannot work with these shards) still ends the run.
    """
    where = f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"
    try:
        return decode_members(sample, cfg, transform, stats, rng, where)
    except UserError:
        raise
    except Exception as error:
        stats.skip(f"sample raised {type(error).__name__}", where, error)
        return None


def decode_members(
    sample: dict,
    cfg: LoaderConfig,
    transform: ImageTransform | BucketTransform,
    stats: StreamStats,
    rng: random.Random | None,
    where: str,
) -> dict | None:
    image_key = next((k for k in cfg.image_keys if k in sample), None)
    if image_key is None and LATENT_KEY not in sample:
        stats.skip("missing image", where)
        return None
    meta = read_meta(sample)
    try:
        caption = read_caption(sample, cfg.caption_keys, meta)
    except UnicodeDecodeError as error:
        stats.skip("caption not UTF-8", where, error)
        return None
    if caption is None:
        stats.skip("missing caption", where)
        return None
    if not caption:
        stats.skip("empty caption", where)
        return None
    if LATENT_KEY in sample:
        return decode_cached(sample, cfg, stats, rng, where, caption, meta)
    try:
        with Image.open(io.BytesIO(sample[image_key])) as raw:
            raw.draft("RGB", transform.draft_size)  # JPEG: decode at reduced size
            if too_many_pixels(raw.size, transform.draft_size):  # read from the header only
                stats.skip("too many pixels", where)
                return None
            ImageOps.exif_transpose(raw, in_place=True)  # phone photos: rotation in EXIF
            image = transform(to_rgb(raw), rng)  # a bucket's random crop draws first
    except Exception as error:  # PIL raises many types (incl. DecompressionBombError)
        stats.skip("undecodable image", where, error)
        return None
    if rng is not None:
        image = augment(image, cfg, rng)
        caption = shuffle_tags(caption, cfg.shuffle_tags, rng)
    stats.ok += 1
    return {"image": image, "caption": caption, "key": sample.get("__key__", ""), "meta": meta}


class CacheError(LoaderUserError):
    """Cached-latent shards that cannot serve this configuration (e.g. flips on, none cached)."""


def load_array(data: bytes) -> torch.Tensor:
    return torch.from_numpy(np.load(io.BytesIO(data), allow_pickle=False))


def decode_cached(
    sample: dict,
    cfg: LoaderConfig,
    stats: StreamStats,
    rng: random.Random | None,
    where: str,
    caption: str,
    meta: dict,
) -> dict | None:
    """A cached-latent sample -> {"latent", ["text"], "caption", "key", "meta"}. The flip takes the
    same draw from rng as augment's, so a stream picks the same flips from a cache as from images."""
    key = LATENT_KEY
    if rng is not None and cfg.random_flip and rng.random() < 0.5:
        if LATENT_FLIP_KEY not in sample:
            raise CacheError(
                f"{where} has no flipped latents (cached with data.random_flip=false): train with "
                "data.random_flip=false, or cache again with data.random_flip=true"
            )
        key = LATENT_FLIP_KEY
    if TEXT_KEY in sample and cfg.shuffle_tags is not None:
        raise CacheError(
            f"{where} holds the caption's text states as written: data.shuffle_tags needs the "
            "text encoder at every step; cache with stage.text_encoder=null, or set "
            "data.shuffle_tags=null"
        )
    try:
        decoded = {"latent": load_array(sample[key])}
        if TEXT_KEY in sample:
            decoded["text"] = load_array(sample[TEXT_KEY])
    except ValueError as error:  # a truncated or foreign .npy
        stats.skip("unreadable latents", where, error)
        return None
    if rng is not None:
        caption = shuffle_tags(caption, cfg.shuffle_tags, rng)
    stats.ok += 1
    return {**decoded, "caption": caption, "key": sample.get("__key__", ""), "meta": meta}


def augment(image: torch.Tensor, cfg: LoaderConfig, rng: random.Random) -> torch.Tensor:
    """Random crop and horizontal flip from the given rng (torchvision's draw from the global one)."""
    size = cfg.image_size
    if cfg.crop == "random" and not cfg.bucketed:  # a bucket's crop is its transform's
        top = rng.randint(0, image.shape[-2] - size)
        left = rng.randint(0, image.shape[-1] - size)
        image = image[..., top : top + size, left : left + size]
    if cfg.random_flip and rng.random() < 0.5:
        image = image.flip(-1)
    return image


def collate(samples: list[dict], stats: StreamStats) -> dict[str, Any]:
    tensors = {}
    for name in ("image", "latent", "text"):
        present = [s[name] for s in samples if name in s]
        if present and len(present) != len(samples):
            raise CacheError(f"a batch mixes samples with and without {name!r}: mixed shard kinds")
        if present:
            if len({tuple(t.shape) for t in present}) > 1:  # only cached latents can differ here
                raise CacheError(
                    f"a batch mixes {name} shapes {sorted({tuple(t.shape) for t in present})}: "
                    "the cache was made with aspect-ratio buckets; train with the same "
                    "data.buckets / data.bucket_max_ratio as it was cached with"
                )
            tensors[name] = torch.stack(present)
    return {
        **tensors,
        "caption": [s["caption"] for s in samples],
        "key": [s["key"] for s in samples],
        "meta": [s["meta"] for s in samples],
        "skipped": stats.take_new_skips(),
    }
