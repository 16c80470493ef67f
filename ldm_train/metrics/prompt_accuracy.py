"""Do generated images show what their prompts ask for? Zero-shot classification of each image with
the trained CLIP (ldm_train.metrics.zero_shot's class-prompt classifiers), against the prompt's labels."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from ldm_train.formats.clip_model import load_clip
from ldm_train.metrics.sample import SampleMetrics
from ldm_train.metrics.zero_shot import ZeroShotTask


@torch.no_grad()
def prompt_accuracy(
    clip_dir: str | Path,
    images: torch.Tensor | Sequence[torch.Tensor],
    labels: Sequence[Mapping],
    tasks: Mapping[str, ZeroShotTask],
    batch_size: int = 256,
) -> dict[str, float]:
    """images: N x 3 x H x W in [-1, 1], or such tensors of several sizes one after the other;
    labels[i]: what image i should show (e.g. {"shape": "circle", "colour": "red"}). Returns per
    task the share classified as asked ("<task>_acc"), and "accuracy": the share of images right in
    every task their prompt names (SampleMetrics' zero-shot accuracy, without its distances)."""
    metrics = SampleMetrics(load_clip(clip_dir), features=None, tasks=tasks, batch_size=batch_size)
    start = 0
    for chunk in [images] if isinstance(images, torch.Tensor) else images:
        metrics.update(chunk, labels=labels[start : start + len(chunk)])
        start += len(chunk)
    return {name: float(value) for name, value in metrics.compute().items()}
