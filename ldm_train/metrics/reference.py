"""What generated images are measured against: the validation images, and the prompts to generate
for (data.prompts when set, else the first captions of the validation shards, with their labels)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from ldm_train.data.datamodule import check_shards_exist, expand_urls
from ldm_train.data.stream import LoaderConfig, ValStream
from ldm_train.errors import UserError


@dataclass
class ValidationSet:
    """The first images of the validation shards with their captions and sample json (labels)."""

    images: torch.Tensor  # N x 3 x H x W in [-1, 1]
    captions: list[str] = field(default_factory=list)
    metas: list[dict] = field(default_factory=list)


def validation_batches(
    urls: str | Sequence[str], loader: LoaderConfig, limit: int, option: str = "data.val_urls"
) -> Iterator[dict]:
    """The batches of one deterministic pass over the shards (the validation loader's decoding and
    centre crop), in this process, up to `limit` samples (the last batch cut to fit)."""
    expanded = expand_urls(urls)
    check_shards_exist(expanded, option)
    seen = 0
    for batch in ValStream(expanded, loader):
        keep = min(len(batch["caption"]), limit - seen)
        yield {key: batch[key][:keep] for key in ("image", "caption", "meta")}
        seen += keep
        if seen >= limit:
            return


def read_validation(
    urls: str | Sequence[str], loader: LoaderConfig, limit: int, option: str = "data.val_urls"
) -> ValidationSet:
    """The first `limit` samples of validation_batches, held in memory."""
    images, captions, metas = [], [], []
    for batch in validation_batches(urls, loader, limit, option):
        images.append(batch["image"])
        captions += batch["caption"]
        metas += batch["meta"]
    return ValidationSet(torch.cat(images), captions, metas)


def loader_options(data: Mapping[str, Any], image_size: int, batch_size: int = 64) -> LoaderConfig:
    """The loader options of a `data` config section (its other keys ignored), or the defaults at
    image_size when it has none."""
    # Square centre crops, buckets or not: one tensor of references (features resize anyway).
    known = {f for f in LoaderConfig.__dataclass_fields__ if f in data and "bucket" not in f}
    options = {key: data[key] for key in known}
    options.setdefault("image_size", image_size)
    options |= {"val_batch_size": batch_size, "num_workers": 0}
    return LoaderConfig(**options)


def prompt_labels(prompts: Sequence[Any]) -> tuple[list[str], list[dict]]:
    """data.prompts entries -> (captions, labels): a string has no labels; a dict has a "caption"
    and its other keys are labels (e.g. {"caption": ..., "shape": "circle"})."""
    if isinstance(prompts, DictConfig | ListConfig):
        prompts = OmegaConf.to_container(prompts, resolve=True)
    captions, labels = [], []
    for prompt in prompts:
        caption = prompt.get("caption") if isinstance(prompt, Mapping) else prompt
        if not isinstance(caption, str):
            raise UserError(f"a prompt must be a string or have a 'caption' string, got {prompt!r}")
        captions.append(caption)
        named = isinstance(prompt, Mapping)
        labels.append({k: v for k, v in prompt.items() if k != "caption"} if named else {})
    return captions, labels


def choose_prompts(
    configured: Sequence[Any] | None, validation: ValidationSet | None, limit: int
) -> tuple[list[str], list[dict]]:
    """Prompts and their labels: the configured ones (data.prompts) when set, else the first
    `limit` captions of the validation set with their sample json; ([], []) if neither."""
    if configured:
        return prompt_labels(configured)
    if validation is not None and validation.captions:
        return validation.captions[:limit], validation.metas[:limit]
    return [], []
