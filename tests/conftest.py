"""Shared fixtures: tiny shards of the embedded dataset and the real config composed for CPU tests."""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import open_clip
import pytest
import torch
from omegaconf import DictConfig
from open_clip.model import set_model_preprocess_cfg

from ldm_train.config import compose_config
from ldm_train.data.shapes import make_shapes_dataset

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

TINY = dict(image_size=32, n_train=256, n_val=64, train_shards=4, val_shards=2, seed=0)


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> dict[str, str]:
    """A small copy of the embedded dataset: 4 train shards of 64 samples, 2 val shards of 32."""
    root = tmp_path_factory.mktemp("data") / "shapes-32"
    make_shapes_dataset(root, progress=False, **TINY)
    return {
        "root": str(root),
        "train_urls": f"{root}/train-{{000000..000003}}.tar",
        "val_urls": f"{root}/val-{{000000..000001}}.tar",
    }


@pytest.fixture
def make_cfg(tmp_path: Path, tiny_shards) -> Callable[..., DictConfig]:
    """compose_config with CPU, CSV logging, tiny shards and outputs under tmp_path."""

    def compose(*overrides: str, extra: Sequence[str] = ()) -> DictConfig:
        base = [
            f"paths.output_root={tmp_path / 'outputs'}",
            f"paths.data_dir={tmp_path / 'data'}",
            # Braces are Hydra syntax too: quote brace patterns inside the override.
            f"data.train_urls='{tiny_shards['train_urls']}'",
            f"data.val_urls='{tiny_shards['val_urls']}'",
            "data.make_dataset=null",
            "data.num_workers=0",
            "data.batch_size=8",
            "data.batches_per_epoch=4",
            "data.shuffle_buffer=32",
            "logger=csv",
            "trainer.accelerator=cpu",
            "trainer.max_steps=4",
            "trainer.limit_val_batches=2",
            "trainer.enable_progress_bar=false",
        ]
        return compose_config([*base, *overrides, *extra])

    return compose


# A tiny open_clip CLIP card: text width 32, 3 layers, 24 tokens (vocabulary: open_clip's BPE).
TINY_CLIP_CARD = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
    "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 3},
}


@pytest.fixture(scope="session")
def make_open_clip() -> Callable[..., tuple[open_clip.CLIP, dict]]:
    """make(quick_gelu=False, **text_cfg) -> (a random open_clip CLIP in eval mode, its card)."""

    def make(quick_gelu: bool = False, **text_cfg) -> tuple[open_clip.CLIP, dict]:
        card = copy.deepcopy(TINY_CLIP_CARD)
        card["text_cfg"].update(text_cfg)
        if quick_gelu:
            card["quick_gelu"] = True
        torch.manual_seed(0)
        model = open_clip.CLIP(**card).eval()
        mean, std = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD
        set_model_preprocess_cfg(model, {"size": 32, "mean": mean, "std": std})  # to save it
        return model, card

    return make
