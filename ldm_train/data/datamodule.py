"""The one LightningDataModule every stage trains on: image-caption WebDataset shards."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import glob
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import lightning as L
import torch
from braceexpand import braceexpand
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader
from torchdata.stateful_dataloader import StatefulDataLoader

from ldm_train.data.stream import LoaderConfig, build_pipeline, check_has_sample
from ldm_train.data.workers import init_worker, kill_workers_at_exit
from ldm_train.errors import UserError, check_choice, check_keys

log = logging.getLogger(__name__)

# data.* keys that are not loader options.
DATASET_KEYS = (
    "name",
    "root",
    "channels",
    "train_urls",
    "val_urls",
    "make_dataset",
    "zero_shot",
    "prompts",
)


def expand_urls(urls: str | Sequence[str]) -> list[str]:
    """Brace patterns (one string, or a list of them) -> the list of shard URLs; a local pattern
    with * or ? matches files (sorted): data/photos/train-*.tar."""
    patterns = [urls] if isinstance(urls, str) else list(urls)
    expanded = [url for pattern in patterns for url in braceexpand(pattern)]
    return [match for url in expanded for match in local_matches(url)]


def local_matches(url: str) -> list[str]:
    """The files a local wildcard names (sorted; itself if none match: reported as missing)."""
    path = local_path(url)
    if path is None or not any(wild in path for wild in "*?"):
        return [url]
    return sorted(glob.glob(path)) or [url]


def shards_name(urls: str | Sequence[str] | None) -> str:
    """${shards_name:${data.train_urls}}, data=webdataset's name (so its experiment's): the folder
    that holds the shards (data/photos/train-{000000..000009}.tar: photos), or for a latent cache
    the folder of the shards it was made from (its cache.json says); "webdataset" if none."""
    patterns = [urls] if isinstance(urls, str) else list(urls or [])
    if not patterns or not isinstance(patterns[0], str):
        return "webdataset"
    words = patterns[0].removeprefix("pipe:").split()
    path = next((w for w in words if ".tar" in w), words[0] if words else "")
    folder = Path(local_path(path) or path.split("://", 1)[-1]).parent
    info = folder / "cache.json"  # ldm_train.cache_latents' record of its source
    if info.is_file():
        with contextlib.suppress(ValueError, KeyError, IndexError, TypeError):
            return shards_name(json.loads(info.read_text())["source_urls"][0])
    return folder.name if folder.name not in ("", ".", "..") else "webdataset"


OmegaConf.register_new_resolver("shards_name", shards_name, replace=True)


def local_path(url: str) -> str | None:
    """The file a shard URL names (a path or a file:// URL); None for pipes and remote URLs."""
    if url.startswith("file://"):
        return url[len("file://") :]
    return None if url.startswith("pipe:") or "://" in url else url


def check_shards_exist(urls: list[str], option: str) -> None:
    """Local shards: none found is an error; some missing is a warning (they are skipped, counted)."""
    local = [url for url in urls if local_path(url) is not None]
    missing = [url for url in local if not Path(local_path(url)).is_file()]
    if local and len(missing) == len(local):
        raise UserError(
            f"{option}: no shard found at {urls[0]}"
            + (f" ... {urls[-1]}" if len(urls) > 1 else "")
            + f" ({len(urls)} expected); make them (see data/README.md) or point {option} at yours"
        )
    if missing:
        log.warning(
            "%s: %d of %d shards are missing (e.g. %s); they will be skipped",
            option,
            len(missing),
            len(urls),
            missing[0],
        )


def batch_as_is(batch: dict) -> dict:
    """The DataLoader's collate_fn: batches come ready from the workers. (Its default with
    batch_size=None, default_convert, walks every caption and meta dict of the batch again: 15 us
    per sample, a tenth of a 32 px sample's whole decoding.)"""
    return batch


class TrainLoader(StatefulDataLoader):
    """torchdata's StatefulDataLoader, whose state is that of the last batch Lightning trained on.

    Lightning fetches one batch ahead of the step it runs (to know whether it is the last), so the
    loader's own state is one batch ahead of the checkpoint; this keeps the state from before the
    latest fetch.
    """

    _state_before_fetch: dict | None = None

    def __iter__(self):
        return self._tracked(super().__iter__())

    def _tracked(self, batches):
        while True:
            self._state_before_fetch = super().state_dict()
            try:
                batch = next(batches)
            except StopIteration:
                return
            yield batch

    def state_dict(self) -> dict:
        return self._state_before_fetch or super().state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self._state_before_fetch = None
        super().load_state_dict(state_dict)


class WebDataModule(L.LightningDataModule):
    """Batches of {"image": B x 3 x H x W float in [-1, 1], "caption": [str], "key": [str],
    "meta": [dict], "skipped": int} from WebDataset shards; the same for every stage."""

    def __init__(
        self,
        train_urls: str | Sequence[str],
        val_urls: str | Sequence[str] | None,
        loader: LoaderConfig,
        make_dataset: Callable[[], object] | None = None,
    ):
        super().__init__()
        self.train_urls = expand_urls(train_urls)
        self.val_urls = expand_urls(val_urls) if val_urls else []
        self.loader = loader
        self.make_dataset = make_dataset

    @classmethod
    def from_config(cls, data: DictConfig) -> WebDataModule:
        """Build from the `data` config group; unknown keys and bad choices are one-line errors."""
        options = {
            k: v
            for k, v in OmegaConf.to_container(data, resolve=True).items()
            if k not in DATASET_KEYS
        }
        check_keys(
            "data", options, [f.name for f in dataclasses.fields(LoaderConfig)] + list(DATASET_KEYS)
        )
        loader = LoaderConfig(**options)
        check_choice("data.crop", loader.crop, ["center", "random"])
        loader.bucket_list  # noqa: B018  (one-line errors for bad bucket options, here)
        if loader.bucket_cap is not None and not loader.bucket_cap >= loader.batch_size:
            raise UserError(
                f"data.bucket_cap={loader.bucket_cap} is below data.batch_size="
                f"{loader.batch_size}: no batch could form; raise it, or null for no cap"
            )
        make = data.get("make_dataset")
        return cls(
            data.train_urls, data.get("val_urls"), loader, instantiate(make) if make else None
        )

    def prepare_data(self) -> None:
        # Lightning calls this once per node before the other ranks start reading.
        if self.make_dataset is not None:
            self.make_dataset()

    def _rank_and_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def setup(self, stage: str | None = None) -> None:
        check_shards_exist(self.train_urls, "data.train_urls")
        if self.val_urls:
            check_shards_exist(self.val_urls, "data.val_urls")
            # Now rather than after a whole epoch of training (every rank: they agree, none waits).
            check_has_sample(self.val_urls, self.loader)
        _, world = self._rank_and_world()
        readers = world * max(1, self.loader.num_workers)
        if len(self.train_urls) < readers:
            log.warning(
                "data.train_urls has %d shard(s) for %d readers (%d rank(s) x %d worker(s)): every "
                "reader opens every shard and keeps 1/%d of its samples, which wastes I/O; write at "
                "least %d shards (e.g. more, smaller tars) or lower data.num_workers",
                len(self.train_urls),
                readers,
                world,
                max(1, self.loader.num_workers),
                readers,
                readers,
            )

    def _loader(self, urls: list[str], train: bool) -> DataLoader:
        rank, world = self._rank_and_world()
        dataset = build_pipeline(urls, self.loader, train=train, rank=rank, world_size=world)
        workers = self.loader.num_workers
        # Training: torchdata's StatefulDataLoader gathers each worker's stream position with every
        # batch, and Lightning stores it in checkpoints, so a resumed run sees the same data.
        loader = TrainLoader if train else DataLoader
        if workers > 0:
            kill_workers_at_exit()
        return loader(
            dataset,
            batch_size=None,  # batched inside the workers
            collate_fn=batch_as_is,
            num_workers=workers,
            persistent_workers=train and workers > 0,
            pin_memory=torch.cuda.is_available(),
            worker_init_fn=functools.partial(init_worker, rank=rank),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_urls, train=True)

    def plain_batches(self) -> DataLoader:
        """One deterministic pass over the validation shards (the training shards if there are
        none), decoded as for validation: for measurements outside the training loop."""
        return self._loader(self.val_urls or self.train_urls, train=False)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader(self.val_urls, train=False) if self.val_urls else []
