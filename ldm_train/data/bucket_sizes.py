"""Aspect-ratio buckets: the image sizes a bucketed loader trains at, which bucket an image goes
to, and how it is fitted to it.

A bucket is a (width, height) in pixels. `data.buckets` lists them, or `data.bucket_max_ratio`
makes them from `data.image_size`: every shape in steps of `data.bucket_step` (the VAE's
downsampling factor, or a multiple of it) with at most the square's pixel area and a long/short
side ratio up to the maximum (NovelAI's recipe, as kohya's and SDXL's scripts build theirs). Each
image goes to the bucket nearest its aspect ratio (the distance of the log ratios: 2:1 is as far
from 1:1 as 1:2), is resized keeping its ratio until it covers the bucket and is cropped to it
(centre, or random in training with data.crop=random). Grouping into batches of one shape:
ldm_train/data/bucket_batches.py.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import ListConfig, OmegaConf
from PIL import Image

from ldm_train.errors import UserError

Size = tuple[int, int]  # (width, height) in pixels


def make_buckets(image_size: int, max_ratio: float, step: int) -> list[Size]:
    """Shapes in steps of `step`, at most image_size² pixels, long/short side <= max_ratio: for each
    width up to the square's, the tallest height that fits the area, in both orientations; sorted
    from the tallest to the widest."""
    area = image_size * image_size
    found: set[Size] = set()
    for width in range(step, image_size + 1, step):
        height = area // width // step * step
        if height >= width and height <= max_ratio * width + 1e-9:
            found |= {(width, height), (height, width)}
    return sorted(found, key=log_ratio)


def log_ratio(size: Sequence[int]) -> float:
    width, height = size
    return math.log(width / height)


def nearest_bucket(width: int, height: int, buckets: Sequence[Size]) -> Size:
    """The bucket nearest the image's aspect ratio (log-ratio distance; ties: the earlier one)."""
    target = math.log(width / height)
    return min(buckets, key=lambda bucket: abs(log_ratio(bucket) - target))


def bucket_sizes(
    buckets: Sequence[Sequence[int]] | None,
    max_ratio: float | None,
    image_size: int,
    step: int,
) -> list[Size] | None:
    """The loader's buckets from its options (None: no buckets, square images); one-line errors."""
    if buckets is not None and max_ratio is not None:
        raise UserError(
            "data.buckets and data.bucket_max_ratio are both set: give the list, or the largest "
            "ratio to make one from data.image_size (set the other to null)"
        )
    if max_ratio is not None:
        if not isinstance(step, int) or step < 1 or image_size % step:
            raise UserError(
                f"data.bucket_step={step!r} must be a whole divisor of data.image_size="
                f"{image_size} (the VAE's downsampling factor, or a multiple of it)"
            )
        if not max_ratio >= 1:
            raise UserError(f"data.bucket_max_ratio={max_ratio}; need >= 1 (e.g. 2.0)")
        return make_buckets(image_size, max_ratio, step)
    if buckets is None:
        return None
    sizes = [tuple(bucket) for bucket in buckets]
    if not sizes or any(
        len(s) != 2 or not all(isinstance(v, int) and v > 0 for v in s) for s in sizes
    ):
        raise UserError(
            f"data.buckets={list(buckets)!r}: give a list of [width, height] pairs of positive "
            "integers, e.g. data.buckets=[[32,32],[48,32],[32,48]]"
        )
    if len(set(sizes)) != len(sizes) or len({log_ratio(s) for s in sizes}) != len(sizes):
        raise UserError(f"data.buckets={list(buckets)!r}: two buckets have the same aspect ratio")
    return sorted(sizes, key=log_ratio)


def data_bucket_sizes(data: Any) -> list[list[int]] | None:
    """The `data` config section's buckets as [width, height] lists (None without buckets): the
    `${bucket_sizes:${data}}` resolver, for parts that need them (the U-Net's latent check)."""
    buckets = data.get("buckets")
    if isinstance(buckets, ListConfig):
        buckets = OmegaConf.to_container(buckets, resolve=True)
    sizes = bucket_sizes(
        buckets,
        data.get("bucket_max_ratio"),
        data.get("image_size", 256),
        data.get("bucket_step", 8),
    )
    return None if sizes is None else [list(size) for size in sizes]


if not OmegaConf.has_resolver("bucket_sizes"):
    OmegaConf.register_new_resolver("bucket_sizes", data_bucket_sizes)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> C x H x W float in [-1, 1] (one numpy view and one in-place scale)."""
    array = np.array(image, dtype=np.uint8, copy=True)  # H x W x 3, writable
    return torch.from_numpy(array).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def cover_size(width: int, height: int, bucket: Size) -> Size:
    """The size, keeping the ratio, at which an image just covers the bucket."""
    scale = max(bucket[0] / width, bucket[1] / height)
    return max(bucket[0], round(width * scale)), max(bucket[1], round(height * scale))


def crop_box(size: Size, bucket: Size, rng: random.Random | None) -> tuple[int, int]:
    """(left, top) of the bucket inside an image of `size` that covers it: centred, or drawn from
    rng (top first, then left, as the square loader's random crop)."""
    spare_x, spare_y = size[0] - bucket[0], size[1] - bucket[1]
    if rng is None:
        return round(spare_x / 2), round(spare_y / 2)
    top = rng.randint(0, spare_y)
    return rng.randint(0, spare_x), top


class BucketTransform:
    """PIL RGB image -> C x h x w tensor in [-1, 1] at its bucket's size: resized keeping its
    ratio to cover the bucket (PIL bilinear with its antialiasing, as the square loader's
    torchvision Resize on PIL images), then cropped to it: centred, or at a place drawn from the
    sample's rng when training with data.crop=random."""

    def __init__(self, buckets: Sequence[Size], random_crop: bool):
        self.buckets = list(buckets)
        self.random_crop = random_crop
        side = max(max(bucket) for bucket in self.buckets)
        self.draft_size = (side, side)  # JPEG draft: decode at a reduced size that still covers

    def __call__(self, image: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        bucket = nearest_bucket(*image.size, self.buckets)
        size = cover_size(*image.size, bucket)
        if size != image.size:
            image = image.resize(size, Image.Resampling.BILINEAR)
        if size != bucket:
            left, top = crop_box(size, bucket, rng if self.random_crop else None)
            image = image.crop((left, top, left + bucket[0], top + bucket[1]))
        return to_tensor(image)


def refit(tensor: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """C x H x W -> C x height x width: resized keeping its ratio to cover, centre-cropped (a held
    sample moved to another bucket: ldm_train/data/bucket_batches.py)."""
    if tuple(tensor.shape[-2:]) == (height, width):
        return tensor
    new_width, new_height = cover_size(tensor.shape[-1], tensor.shape[-2], (width, height))
    resized = F.interpolate(
        tensor[None].float(), size=(new_height, new_width), mode="bilinear", antialias=True
    )[0].to(tensor.dtype)
    left, top = crop_box((new_width, new_height), (width, height), None)
    return resized[:, top : top + height, left : left + width]
