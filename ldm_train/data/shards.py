"""How our shards are named on disk: <prefix>-NNNNNN.tar, numbered from 0 (the shapes maker, the
folder converter and the latent cache all write them so; WebDataset reads a set of them by the
brace URL that `shard_urls` gives)."""

from __future__ import annotations

from pathlib import Path

DIGITS = 6


def shard_path(out_dir: str | Path, prefix: str, index: int) -> Path:
    """OUT/<prefix>-00000<index>.tar."""
    return Path(out_dir) / f"{prefix}-{index:0{DIGITS}d}.tar"


def shard_paths(out_dir: str | Path, prefix: str, count: int) -> list[Path]:
    return [shard_path(out_dir, prefix, index) for index in range(count)]


def shard_urls(out_dir: str | Path, prefix: str, count: int) -> str:
    """The WebDataset URL of shards 0..count-1, e.g. OUT/train-{000000..000003}.tar."""
    if count == 1:
        return str(shard_path(out_dir, prefix, 0))
    last = f"{count - 1:0{DIGITS}d}"
    return str(Path(out_dir) / f"{prefix}-{{{'0' * DIGITS}..{last}}}.tar")


def shard_writer_pattern(out_dir: str | Path, prefix: str) -> str:
    """The pattern webdataset's ShardWriter fills in with each shard's number ("%" in the path
    itself escaped)."""
    return str(Path(out_dir) / f"{prefix}-").replace("%", "%%") + f"%0{DIGITS}d.tar"


def shard_glob(prefix: str) -> str:
    """A glob for every shard of this prefix in a folder."""
    return f"{prefix}-*.tar"
