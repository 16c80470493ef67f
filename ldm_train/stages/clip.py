"""Stage clip: contrastive image-text pretraining of an open_clip model, as open_clip trains it.

The net is an `open_clip.CLIP` built from a model card (one of open_clip's, e.g. "ViT-B-32", and/or
sizes in the same format from a YAML preset); the loss is open_clip's ClipLoss or SigLipLoss over all
ranks; validation measures retrieval recall and zero-shot accuracy; `export` writes a folder that
open_clip loads by itself (and that ldm_train.diffusion.text_encoder reads for the U-Net stage).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import inspect
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import open_clip
import torch
from omegaconf import DictConfig, OmegaConf
from open_clip.model import CLIPTextCfg, CLIPVisionCfg, set_model_preprocess_cfg
from open_clip.utils import to_2tuple
from torchmetrics import CatMetric, MeanMetric
from torchmetrics.classification import MulticlassAccuracy
from torchvision.transforms.v2 import functional as TF

from ldm_train.errors import UserError, check_choice, check_keys
from ldm_train.formats.clip_model import ClipNet, save_clip
from ldm_train.losses.contrastive import (
    LOSS_KINDS,
    ContrastiveLossKind,
    build_contrastive_loss,
    contrastive_terms,
)
from ldm_train.metrics.zero_shot import IGNORE_LABEL, parse_zero_shot, retrieval_recall
from ldm_train.perf import Perf
from ldm_train.pretrained import Pretrained, unwrap
from ldm_train.stages.base import OptimizerFactory, SchedulerFactory, StageModule

log = logging.getLogger(__name__)

Tokenizer = Callable[[list[str]], torch.Tensor]

# open_clip_train's rule (main.py): no weight decay on gains, biases and the temperature; we add
# embeddings (token, positional, class), as its `no_weight_decay()` and timm do.
NO_DECAY_NAME_PARTS = ("bn", "ln", "bias", "logit_scale", "embedding")
MAX_LOGIT_SCALE = math.log(100)  # CLIP clamps the learned temperature at 100
# SigLIP's initial temperature and bias (paper, sec. 3.2; open_clip's *-SigLIP cards).
SIGLIP_INIT_LOGIT_SCALE = math.log(10)
SIGLIP_INIT_LOGIT_BIAS = -10.0
# The loader resizes with PIL bilinear (antialiased) on the shorter side, then centre-crops.
LOADER_PREPROCESS = {"interpolation": "bilinear", "resize_mode": "shortest"}

CLIP_KEYS = set(inspect.signature(open_clip.CLIP.__init__).parameters) - {"self", "cast_dtype"}
TOWER_KEYS = {
    "vision_cfg": {f.name for f in dataclasses.fields(CLIPVisionCfg)},
    "text_cfg": {f.name for f in dataclasses.fields(CLIPTextCfg)},
}
# Cards with these build towers from timm / Hugging Face (CustomTextCLIP), which need downloads.
FOREIGN_TOWER_KEYS = {"vision_cfg": "timm_model_name", "text_cfg": "hf_model_name"}


def merge_card(base: Mapping, overrides: Mapping) -> dict:
    """base with overrides on top; the tower configs merge key by key."""
    merged = copy.deepcopy(dict(base))
    for key, value in overrides.items():
        if key in TOWER_KEYS and isinstance(value, Mapping):
            merged[key] = {**merged.get(key, {}), **value}
        else:
            merged[key] = value
    return merged


def model_card(card: str | None = None, **overrides: Any) -> dict:
    """An open_clip model config (the JSON cards in open_clip/model_configs): open_clip's card named
    `card`, if given, with `overrides` on top; checked, with a one-line error for a bad key."""
    overrides = {
        k: OmegaConf.to_container(v, resolve=True) if isinstance(v, DictConfig) else v
        for k, v in overrides.items()
    }
    base: dict = {}
    if card is not None:
        base = open_clip.get_model_config(card)
        if base is None:
            close = difflib.get_close_matches(card, open_clip.list_models(), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise UserError(
                f"model.net.card={card!r} is not one of open_clip's model cards{hint}; "
                "see open_clip.list_models()"
            )
    cfg = merge_card(base, overrides)
    if cfg.get("custom_text"):
        raise UserError(f"model card {card!r} needs CustomTextCLIP; pick a plain CLIP card")
    check_keys("model.net", cfg, CLIP_KEYS)
    for tower, valid in TOWER_KEYS.items():
        if not isinstance(cfg.get(tower), Mapping):
            raise UserError(f"model.net.{tower} is missing; give the tower's sizes or a card")
        check_keys(f"model.net.{tower}", cfg[tower], valid)
        if cfg[tower].get(FOREIGN_TOWER_KEYS[tower]):
            raise UserError(
                f"model card {card!r} builds its {tower} from a pretrained library model "
                f"({FOREIGN_TOWER_KEYS[tower]}); pick a card with open_clip's own towers"
            )
    if "embed_dim" not in cfg:
        raise UserError("model.net.embed_dim is missing")
    return cfg


def build_clip(card: str | None = None, **overrides: Any) -> ClipNet:
    """A randomly initialised open_clip.CLIP from `model_card(card, **overrides)`, never pretrained
    weights, with its card (what the export writes for open_clip)."""
    cfg = model_card(card, **overrides)
    return ClipNet(open_clip.CLIP(**cfg), cfg)


def weight_decay_groups(
    named_parameters: Iterable[tuple[str, torch.nn.Parameter]],
) -> list[dict[str, Any]]:
    """Optimizer groups: decay on weight matrices; none on gains, biases, embeddings, logit_scale."""
    decay, no_decay = [], []
    for name, param in named_parameters:
        if not param.requires_grad:
            continue
        exempt = param.ndim < 2 or any(part in name for part in NO_DECAY_NAME_PARTS)
        (no_decay if exempt else decay).append(param)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


class ClipStage(StageModule):
    def __init__(
        self,
        net: ClipNet | Pretrained,
        tokenizer: Tokenizer,
        optimizer: OptimizerFactory,
        lr_scheduler: SchedulerFactory | None = None,
        loss: ContrastiveLossKind = "clip",
        local_loss: bool = False,
        gather_with_grad: bool = False,
        zero_shot: Mapping | None = None,
        image_mean: tuple[float, float, float] = open_clip.OPENAI_DATASET_MEAN,
        image_std: tuple[float, float, float] = open_clip.OPENAI_DATASET_STD,
        export_name: str = "ldm-train-clip",
        perf: Perf | None = None,
        buckets: Sequence[Sequence[int]] | None = None,
    ):
        """buckets: the loader's aspect-ratio buckets, (width, height), if on: the non-square
        batches are squashed to the tower's square (normalize), and the export's preprocess says
        so."""
        super().__init__(optimizer, lr_scheduler, perf)
        check_choice("stage.module.loss", loss, LOSS_KINDS)
        net, _ = unwrap(net)
        if not isinstance(net, ClipNet):
            raise UserError("ClipStage needs a ClipNet (ldm_train.stages.clip.build_clip)")
        self.net = self.perf.apply(net.model)
        self.net.output_dict = True  # as open_clip_train runs it: features + logit scale by name
        self.model_cfg = copy.deepcopy(net.card)
        self.tokenizer = tokenizer
        self.loss_kind, self.local_loss, self.gather_with_grad = loss, local_loss, gather_with_grad
        self.export_name = export_name
        if loss == "siglip" and self.net.logit_bias is None:
            self._add_siglip_bias()
        self.configure_loss(rank=0, world_size=1)
        self.val_loss_fn = build_contrastive_loss(loss)  # per batch, this rank's negatives only

        self._set_normalization(image_mean, image_std, squash=bool(buckets))
        self.zero_shot = parse_zero_shot(zero_shot)
        self.zero_shot_acc = torch.nn.ModuleDict(
            {
                name: MulticlassAccuracy(
                    len(task.classes), average="micro", ignore_index=IGNORE_LABEL
                )
                for name, task in self.zero_shot.items()
            }
        )
        self.classifiers: dict[str, torch.Tensor] = {}
        self.val_loss = MeanMetric()
        # Features of the whole val pass (gathered from every rank) for retrieval.
        self.val_image_features = CatMetric(nan_strategy="disable")
        self.val_text_features = CatMetric(nan_strategy="disable")

    def _set_normalization(
        self, mean: tuple[float, ...], std: tuple[float, ...], squash: bool
    ) -> None:
        """The loader gives [-1, 1]; CLIP towers expect (x - mean) / std on [0, 1]. The same
        mean/std go into the export's preprocess_cfg, so open_clip's preprocess matches."""
        self.register_buffer("image_mean", torch.tensor(mean).view(1, 3, 1, 1), False)
        self.register_buffer("image_std", torch.tensor(std).view(1, 3, 1, 1), False)
        size = self.net.visual.image_size
        preprocess = {"size": size, "mean": tuple(mean), "std": tuple(std), **LOADER_PREPROCESS}
        if squash:  # as normalize fits bucketed batches: open_clip's preprocess does the same
            preprocess["resize_mode"] = "squash"
        set_model_preprocess_cfg(self.net, preprocess)

    def _add_siglip_bias(self) -> None:
        """SigLIP learns a logit bias beside the temperature; start both where SigLIP does."""
        with torch.no_grad():
            self.net.logit_scale.fill_(SIGLIP_INIT_LOGIT_SCALE)
        self.net.logit_bias = torch.nn.Parameter(
            torch.full_like(self.net.logit_scale, SIGLIP_INIT_LOGIT_BIAS)
        )
        self.model_cfg.update(
            init_logit_scale=SIGLIP_INIT_LOGIT_SCALE, init_logit_bias=SIGLIP_INIT_LOGIT_BIAS
        )

    def configure_loss(self, rank: int, world_size: int) -> None:
        self.loss = build_contrastive_loss(
            self.loss_kind, rank, world_size, self.local_loss, self.gather_with_grad
        )

    def setup(self, stage: str) -> None:
        # Negatives from every rank: the loss gathers features across the process group.
        self.configure_loss(self.global_rank, self.trainer.world_size)

    def trainable_parameters(self) -> list[dict[str, Any]]:
        return weight_decay_groups(self.named_parameters())

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """[-1, 1] -> the tower's input. open_clip's towers take one fixed size (the ViT's grid of
        positional embeddings, the ResNet's attention-pool positions), so batches of another
        shape (aspect-ratio buckets) are squashed to it, ignoring their ratio, as SigLIP
        preprocesses: the whole image stays in view (a centre crop would cut away what a caption
        names, "at the top left") and every input pixel carries image (a letterbox pads a third
        of a 3:2 image's square; on data=shapes_mixed, 600 steps, zero-shot shape accuracy was
        84% squashed vs 46% letterboxed)."""
        pixels = (images + 1) / 2
        size = list(to_2tuple(self.net.visual.image_size))
        if list(pixels.shape[-2:]) != size:
            pixels = TF.resize(pixels, size, antialias=True)  # bilinear, as the loader's
        return (pixels - self.image_mean) / self.image_std

    def forward(self, images: torch.Tensor, captions: list[str]) -> dict[str, torch.Tensor]:
        """open_clip's outputs: image_features, text_features (normalised), logit_scale (exp),
        logit_bias (SigLIP only)."""
        tokens = self.tokenizer(list(captions)).to(self.device)
        images = self.perf.input(self.normalize(images))
        return self.net(images, tokens)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        outputs = self(batch["image"], batch["caption"])
        terms = contrastive_terms(self.loss, **outputs)
        size = len(batch["caption"])
        for name, value in terms.items():
            self.log(f"train/{name}", value, prog_bar=True, batch_size=size)
        self.log("train/logit_scale", outputs["logit_scale"], batch_size=size)
        if "logit_bias" in outputs:
            self.log("train/logit_bias", outputs["logit_bias"], batch_size=size)
        return sum(terms.values())

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        # After the optimizer step, as open_clip_train does: the temperature stays <= 100.
        with torch.no_grad():
            self.net.logit_scale.clamp_(0, MAX_LOGIT_SCALE)

    def on_validation_epoch_start(self) -> None:
        self.classifiers = {
            name: task.classifier(self.net, self.tokenizer, self.device)
            for name, task in self.zero_shot.items()
        }

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        outputs = self(batch["image"], batch["caption"])
        image_features, text_features = outputs["image_features"], outputs["text_features"]
        size = len(batch["caption"])
        self.val_loss.update(contrastive_terms(self.val_loss_fn, **outputs)["contrastive"], size)
        self.log("val/contrastive", self.val_loss, prog_bar=True, batch_size=size)
        self.val_image_features.update(image_features)
        self.val_text_features.update(text_features)
        for name, task in self.zero_shot.items():
            labels = task.labels(batch["meta"]).to(self.device)
            accuracy = self.zero_shot_acc[name]
            accuracy.update(image_features @ self.classifiers[name], labels)
            self.log(f"val/zeroshot_{name}_acc", accuracy, prog_bar=True, batch_size=size)

    def on_validation_epoch_end(self) -> None:
        image_features = self.val_image_features.compute()
        text_features = self.val_text_features.compute()
        self.val_image_features.reset()
        self.val_text_features.reset()
        if isinstance(image_features, torch.Tensor) and len(image_features):
            metrics = retrieval_recall(image_features, text_features)
            self.log_dict({f"val/{k}": v for k, v in metrics.items()}, sync_dist=True)

    def export(self, out_dir: Path) -> Path:
        """An open_clip-loadable folder (ldm_train.formats.clip_model); <export_name>.json holds the bare
        card, for `open_clip.add_model_config(path)` and then
        `create_model_and_transforms(export_name, pretrained=<weights>)`."""
        out_dir = save_clip(self.net, self.model_cfg, out_dir, self.export_name)
        if tuple(self.net.visual.image_mean) != tuple(open_clip.OPENAI_DATASET_MEAN) or tuple(
            self.net.visual.image_std
        ) != tuple(open_clip.OPENAI_DATASET_STD):
            log.warning(
                "trained with image_mean/std other than open_clip's defaults: load the export "
                "with 'local-dir:%s', or pass image_mean/image_std when loading it by name",
                out_dir,
            )
        log.info("exported the CLIP model to %s", out_dir)
        return out_dir
