"""Batches of one shape from a stream of samples of several (aspect-ratio buckets).

Training (BucketBatcher): each bucket holds its samples until it has a batch's worth, which goes
out at once, oldest first, so a batch never mixes shapes and every batch is full (open_clip's loss
gathers equal batches from every rank). Memory is bounded: without a cap a bucket holds at most
batch_size - 1 samples; with `data.bucket_cap` no more than that many samples are held over all
buckets. When a new sample would pass the cap, the bucket holding the oldest sample is moved into
the bucket nearest its aspect ratio that holds samples (each moved sample resized to cover that
shape and centre-cropped, as the square loader does to every image; a cached latent's moments are
resized alike, an approximation), and that bucket yields a batch when it has enough. So a rare
bucket never sits on its samples for long (its oldest sample is the first to move) and nothing is
dropped; moves are counted (data/bucket_moved). The endless stream carries partial buckets across
epochs: nothing is left over.

Exact resume: the batcher's state is where each held sample sits in the reader's stream (pass,
index) and the bucket it is held in; a resumed reader replays those positions (decoding only the
held samples, with their own augmentation draws) and continues with the same batches.

Validation (grouped_batches): the same grouping, with partial batches allowed (at the cap the
fullest bucket goes out; at the end of the pass every bucket does).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from ldm_train.data.bucket_sizes import log_ratio, refit

Shape = tuple[int, int]  # (height, width) of a sample's image or latent
Position = tuple[int, int]  # (pass, index in the pass) of a sample in its reader's stream
TENSOR_KEYS = ("image", "latent")


def shape_of(sample: dict) -> Shape:
    tensor = sample["image"] if "image" in sample else sample["latent"]
    return tuple(tensor.shape[-2:])


def shape_name(shape: Shape) -> str:
    """'<width>x<height>' (latent cells for a latent cache)."""
    return f"{shape[1]}x{shape[0]}"


def moved_to(sample: dict, shape: Shape) -> dict:
    """The sample with its image (or latent moments) refitted to another bucket's shape."""
    return {k: refit(v, *shape) if k in TENSOR_KEYS else v for k, v in sample.items()}


@dataclass
class Held:
    position: Position
    sample: dict  # as decoded, at its own bucket's shape (fitted to another when it goes out)


class BucketBatcher:
    """Full, one-shape batches from samples of several shapes; see the module docstring."""

    def __init__(self, batch_size: int, cap: int | None = None):
        if cap is not None and cap < batch_size:
            raise ValueError(f"bucket cap {cap} < batch size {batch_size}: no batch could form")
        self.batch_size, self.cap = batch_size, cap
        self.buckets: dict[Shape, list[Held]] = {}
        self.moved = 0  # samples moved to another bucket at the cap, in all
        self._reported = 0

    def held(self) -> int:
        return sum(len(bucket) for bucket in self.buckets.values())

    def add(self, sample: dict, position: Position) -> Iterator[list[dict]]:
        """Hold the sample; yield the batches that are ready."""
        shape = shape_of(sample)
        bucket = self.buckets.setdefault(shape, [])
        bucket.append(Held(position, sample))
        if len(bucket) >= self.batch_size:
            yield self._take(shape)
        while self.cap is not None and self.held() > self.cap:
            target = self._move_oldest()
            if len(self.buckets[target]) >= self.batch_size:
                yield self._take(target)

    def _take(self, shape: Shape) -> list[dict]:
        """The bucket's oldest batch_size samples, moved ones fitted to its shape now (from their
        own decoding, however often they moved: what a resumed run's replay gives too)."""
        bucket = self.buckets[shape]
        batch, self.buckets[shape] = bucket[: self.batch_size], bucket[self.batch_size :]
        return [
            moved_to(h.sample, shape) if shape_of(h.sample) != shape else h.sample for h in batch
        ]

    def _move_oldest(self) -> Shape:
        """Move the bucket holding the oldest sample into its nearest non-empty neighbour (by
        aspect ratio; ties: the fuller one); returns that neighbour's shape."""
        full = {shape: bucket for shape, bucket in self.buckets.items() if bucket}
        source = min(full, key=lambda shape: full[shape][0].position)
        ratio = log_ratio(source[::-1])
        target = min(
            (shape for shape in full if shape != source),
            key=lambda shape: (abs(log_ratio(shape[::-1]) - ratio), -len(full[shape]), shape),
        )
        moving, self.buckets[source] = full[source], []
        self.buckets[target] = sorted(self.buckets[target] + moving, key=lambda h: h.position)
        self.moved += len(moving)
        return target

    def report(self) -> dict[str, Any]:
        """What a batch carries for the logs: the samples held per bucket, and the moves since
        the previous batch."""
        fill = {shape_name(shape): len(bucket) for shape, bucket in self.buckets.items()}
        new, self._reported = self.moved - self._reported, self.moved
        return {"bucket_fill": fill, "bucket_moved": new}

    # -- exact resume -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        held = [[*h.position, *shape] for shape, bucket in self.buckets.items() for h in bucket]
        return {"held": held, "moved": self.moved, "reported": self._reported}

    @staticmethod
    def positions(state: dict[str, Any]) -> list[Position]:
        return [(int(p), int(i)) for p, i, _, _ in state["held"]]

    def load_state_dict(self, state: dict[str, Any], samples: dict[Position, dict]) -> None:
        """Refill the buckets from the saved state and the held samples, decoded again
        (positions -> samples, e.g. by replaying the stream)."""
        self.buckets = {}
        for pass_index, index, height, width in state["held"]:
            position, shape = (int(pass_index), int(index)), (int(height), int(width))
            self.buckets.setdefault(shape, []).append(Held(position, samples[position]))
        self.moved, self._reported = state["moved"], state["reported"]


def grouped_batches(
    samples: Iterable[dict], batch_size: int, cap: int | None
) -> Iterator[list[dict]]:
    """Validation: one-shape batches of up to batch_size, in a deterministic order; at the cap
    (samples held over all buckets) the fullest bucket goes out, at the end every bucket."""
    buckets: dict[Shape, list[dict]] = {}
    for sample in samples:
        bucket = buckets.setdefault(shape_of(sample), [])
        bucket.append(sample)
        if len(bucket) == batch_size:
            yield bucket[:]
            bucket.clear()
        elif cap is not None and sum(map(len, buckets.values())) >= cap:
            fullest = max(buckets.values(), key=len)
            yield fullest[:]
            fullest.clear()
    yield from (bucket for bucket in buckets.values() if bucket)


def decode_positions(
    wanted: Iterable[Position], read: Callable[[int], Iterator[dict]], decode: Callable
) -> dict[Position, dict]:
    """Decode the samples at the given positions: read(pass) gives the raw samples of a pass in
    order (index 1 first), decode(raw, pass, index) one sample (None if it fails)."""
    by_pass: dict[int, set[int]] = {}
    for pass_index, index in wanted:
        by_pass.setdefault(pass_index, set()).add(index)
    found: dict[Position, dict] = {}
    for pass_index, indices in sorted(by_pass.items()):
        for index, raw in enumerate(read(pass_index), start=1):
            if index in indices:
                decoded = decode(raw, pass_index, index)
                if decoded is not None:
                    found[(pass_index, index)] = decoded
            if index >= max(indices):
                break
    return found
