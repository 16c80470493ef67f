"""Do generated images show what their prompts ask for? Zero-shot classification of each image with
the trained CLIP (ldm_train.clip_eval's class-prompt classifiers), against the prompt's labels."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from ldm_train.clip_eval import IGNORE_LABEL, ZeroShotTask
from ldm_train.exports.clip import load_clip


@torch.no_grad()
def prompt_accuracy(
    clip_dir: str | Path,
    images: torch.Tensor,
    labels: Sequence[Mapping],
    tasks: Mapping[str, ZeroShotTask],
    batch_size: int = 256,
) -> dict[str, float]:
    """images: N x 3 x H x W in [-1, 1]; labels[i]: what image i should show (e.g. {"shape":
    "circle", "colour": "red"}). Returns per task the share classified as asked ("<task>_acc"),
    and "accuracy": the share of images right in every task their prompt names."""
    clip = load_clip(clip_dir)
    model, tokenizer = clip.model, clip.tokenizer
    mean_t = torch.tensor(clip.mean).view(1, 3, 1, 1)
    std_t = torch.tensor(clip.std).view(1, 3, 1, 1)
    features = torch.cat(
        [
            model.encode_image((((batch + 1) / 2) - mean_t) / std_t, normalize=True)
            for batch in images.float().split(batch_size)
        ]
    )
    correct = torch.ones(len(images), dtype=torch.bool)
    labelled = torch.zeros(len(images), dtype=torch.bool)
    results: dict[str, float] = {}
    for name, task in tasks.items():
        target = task.labels(labels)
        known = target != IGNORE_LABEL
        if not known.any():
            continue
        predicted = (features @ task.classifier(model, tokenizer, "cpu")).argmax(dim=1)
        right = predicted == target
        results[f"{name}_acc"] = right[known].float().mean().item()
        correct &= right | ~known
        labelled |= known
    if labelled.any():
        results["accuracy"] = correct[labelled].float().mean().item()
    return results
