"""Do generated images show what their prompts ask for? Zero-shot classification of each image with
the trained CLIP (ldm_train.clip_eval's class-prompt classifiers), against the prompt's labels."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import open_clip
import torch

from ldm_train.clip_eval import IGNORE_LABEL, ZeroShotTask

CLIP_CONFIG = "open_clip_config.json"


def load_clip(export_dir: str | Path, device: str | torch.device = "cpu"):
    """(model, tokenizer, mean, std) of a stage=clip export, with its image normalisation."""
    export_dir = Path(export_dir)
    name = f"local-dir:{export_dir}"
    model = open_clip.create_model(name, device=device, require_pretrained=True).eval()
    preprocess = json.loads((export_dir / CLIP_CONFIG).read_text()).get("preprocess_cfg", {})
    mean = preprocess.get("mean", open_clip.OPENAI_DATASET_MEAN)
    std = preprocess.get("std", open_clip.OPENAI_DATASET_STD)
    return model, open_clip.get_tokenizer(name), tuple(mean), tuple(std)


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
    model, tokenizer, mean, std = load_clip(clip_dir)
    mean_t = torch.tensor(mean).view(1, 3, 1, 1)
    std_t = torch.tensor(std).view(1, 3, 1, 1)
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
