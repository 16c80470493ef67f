"""CLIP evaluation: image<->text retrieval recall and zero-shot classification from class prompts."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import open_clip
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from ldm_train.errors import UserError, check_keys

RECALL_AT: tuple[int, ...] = (1, 5)
IGNORE_LABEL = -1  # a sample without a known label for a task: left out of its accuracy


@torch.no_grad()
def retrieval_recall(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    ks: Sequence[int] = RECALL_AT,
    chunk_size: int = 1024,
) -> dict[str, torch.Tensor]:
    """Recall@k of image->text and text->image retrieval where pair i is the only match of i.

    The same definition as open_clip_train's get_clip_metrics (the rank of the true pair among all
    candidates), written here because open_clip ships it in its training scripts, not the library,
    and torchmetrics' retrieval metrics want the N x N scores flattened. Queries go in chunks so
    memory stays O(chunk_size x N). Returns {"i2t_r1": ..., "t2i_r1": ..., ...} in [0, 1].
    """
    if image_features.shape != text_features.shape:
        raise ValueError(
            f"need one text per image, got {tuple(image_features.shape)} image and "
            f"{tuple(text_features.shape)} text features"
        )
    image_features = torch.nn.functional.normalize(image_features.float(), dim=-1)
    text_features = torch.nn.functional.normalize(text_features.float(), dim=-1)
    metrics = {}
    for name, queries, candidates in (
        ("i2t", image_features, text_features),
        ("t2i", text_features, image_features),
    ):
        ranks = []
        for start in range(0, len(queries), chunk_size):
            scores = queries[start : start + chunk_size] @ candidates.T
            rows = torch.arange(len(scores), device=scores.device)
            true_score = scores[rows, rows + start]
            ranks.append((scores > true_score[:, None]).sum(dim=1))  # candidates ranked above
        rank = torch.cat(ranks)
        for k in ks:
            metrics[f"{name}_r{k}"] = (rank < k).float().mean()
    return metrics


@dataclass(frozen=True)
class ZeroShotTask:
    """Classify images by the text embeddings of class prompts (the sample json names the label)."""

    label_key: str
    classes: tuple[str, ...]
    templates: tuple[str, ...]

    def labels(self, metas: Sequence[Mapping]) -> torch.Tensor:
        """Class index per sample from meta[label_key]; IGNORE_LABEL when absent or unknown."""
        index = {name: i for i, name in enumerate(self.classes)}
        return torch.tensor(
            [index.get(meta.get(self.label_key), IGNORE_LABEL) for meta in metas], dtype=torch.long
        )

    def classifier(
        self, model: open_clip.CLIP, tokenizer: Callable, device: torch.device | str
    ) -> torch.Tensor:
        """E x C weights: per class the mean of its normalised prompt embeddings, renormalised."""
        return open_clip.build_zero_shot_classifier(
            model,
            tokenizer,
            self.classes,
            self.templates,
            num_classes_per_batch=None,
            device=device,
        )


def parse_zero_shot(spec: Mapping | DictConfig | None) -> dict[str, ZeroShotTask]:
    """The `data.zero_shot` section -> {task: ZeroShotTask}; a one-line UserError for bad input."""
    if spec is None:
        return {}
    if isinstance(spec, DictConfig | ListConfig):
        spec = OmegaConf.to_container(spec, resolve=True)
    if not isinstance(spec, Mapping):
        raise UserError(f"data.zero_shot must map task names to tasks or be null, got {spec!r}")
    tasks = {}
    for name, task in spec.items():
        where = f"data.zero_shot.{name}"
        if not str(name).isidentifier():
            raise UserError(f"{where}: a task name must be a plain identifier (it names a metric)")
        if not isinstance(task, Mapping):
            raise UserError(f"{where} must have label_key, classes and templates, got {task!r}")
        check_keys(where, task, ["label_key", "classes", "templates"])
        missing = [key for key in ("label_key", "classes", "templates") if not task.get(key)]
        if missing:
            raise UserError(f"{where} needs {', '.join(missing)}")
        templates = tuple(str(t) for t in task["templates"])
        bad = [t for t in templates if t.count("{}") != 1]
        if bad:
            raise UserError(
                f"{where}.templates: each needs exactly one '{{}}' for the class: {bad}"
            )
        classes = tuple(str(c) for c in task["classes"])
        if len(set(classes)) != len(classes):
            raise UserError(f"{where}.classes has duplicates: {list(classes)}")
        tasks[str(name)] = ZeroShotTask(str(task["label_key"]), classes, templates)
    return tasks
