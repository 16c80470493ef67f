"""SampleMetrics: how good are generated images, as one torchmetrics Metric.

    metrics = SampleMetrics(load_clip(dir), features="clip", tasks=parse_zero_shot(...))
    metrics.add_reference(val_images)            # per batch; once per run (freeze_reference)
    metrics.update(generated, prompts, labels)   # per batch, on every rank
    metrics.compute()  # {"fd_clip", "kid_clip", "kid_clip_std", "clip_score", "<task>_acc", ...}
    metrics.reset()    # drops the generated side, keeps the reference

- clip_score: the mean cosine between each image's and its prompt's CLIP embedding (-1..1; not
  torchmetrics' CLIPScore, which is 100 x max(cosine, 0) by a transformers model it loads by name
  from the hub: ours uses the CLIP folder the user points at, e.g. the experiment's own).
- fd_clip / fid_inception: the Fréchet distance between the feature Gaussians of the generated and
  reference images (ldm_train.metrics.features: "clip" or "inception" features); lower is better.
  Only Inception features give the FID papers quote.
- kid_clip / kid_inception: KID (unbiased MMD, cubic kernel) on the same features, with its std
  over random subsets; lower is better, and less biased than FD on few images.
- <task>_acc / accuracy: with zero-shot tasks and labelled prompts, the share of images the CLIP
  classifies as their prompt asks, per task and in every task (ldm_train.metrics.zero_shot).

Every state is summed or gathered across DDP ranks by torchmetrics when compute() runs, so every
rank must call it. The CLIP and the extractor live outside the module tree (never in a checkpoint)
and follow the images' device.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torchmetrics import Metric

from ldm_train.diffusion.frozen import Frozen
from ldm_train.errors import UserError
from ldm_train.formats.clip_model import LoadedClip, load_clip
from ldm_train.metrics.distance import FeatureFD, FeatureKID
from ldm_train.metrics.features import ClipImageFeatures, FeatureKind, build_extractor
from ldm_train.metrics.zero_shot import IGNORE_LABEL, ZeroShotTask, parse_zero_shot

# Metric names per feature kind: nobody mistakes a CLIP-feature FD for the FID papers quote.
FD_NAMES = {"clip": "fd_clip", "inception": "fid_inception"}
KID_NAMES = {"clip": "kid_clip", "inception": "kid_inception"}


def build_sample_metrics(
    clip: str | Path | None,
    features: FeatureKind | None = "clip",
    inception_weights: str | Path | None = None,
    zero_shot: Mapping | None = None,
    **options,
) -> SampleMetrics:
    """SampleMetrics from paths and config (a Hydra `_target_` for the stages): the CLIP folder
    (None: no clip_score, accuracy or "clip" features) and data.zero_shot (None: no accuracy)."""
    loaded = load_clip(clip) if clip is not None else None
    tasks = parse_zero_shot(zero_shot) if loaded is not None else {}
    return SampleMetrics(loaded, features, inception_weights, tasks=tasks, **options)


class SampleMetrics(Metric):
    full_state_update = False
    higher_is_better = None  # mixed: clip_score and accuracies up, distances down

    def __init__(
        self,
        clip: LoadedClip | None = None,
        features: FeatureKind | None = "clip",
        inception_weights: str | Path | None = None,
        inception_layer: int = 2048,
        tasks: Mapping[str, ZeroShotTask] | None = None,
        kid_subsets: int = 100,
        kid_subset_size: int = 1000,
        batch_size: int = 64,
        **kwargs,
    ):
        """clip: for clip_score, the zero-shot tasks and "clip" features (None: none of these).
        features: the extractor of FD and KID ("clip" | "inception"; None: no FD or KID);
        inception_layer: 2048 (the pool features every published FID uses), 768, 192 or 64."""
        super().__init__(**kwargs)
        self.tasks = dict(tasks or {})
        if self.tasks and clip is None:
            raise UserError("zero-shot accuracy needs a CLIP folder to classify the images")
        self.kind = features
        self.batch_size = batch_size
        self.tokenizer = clip.tokenizer if clip is not None else None
        self._clip = Frozen(clip.model if clip is not None else None)
        self._clip_images = Frozen(ClipImageFeatures(clip) if clip is not None else None)
        self._extractor = Frozen(None)
        if features == "clip" and clip is not None:
            self._extractor = self._clip_images  # one forward for the score and the distances
        elif features is not None:  # (a one-line error for "clip" without a CLIP, or a bad kind)
            self._extractor = Frozen(
                build_extractor(features, clip, inception_weights, inception_layer)
            )
        self.fd = self.kid = None
        if features is not None:
            size = self._extractor.module.num_features
            self.fd = FeatureFD(size)
            self.kid = FeatureKID(size, subsets=kid_subsets, subset_size=kid_subset_size)
        self.reference_frozen = False
        self._classifiers: dict[str, torch.Tensor] = {}
        self.add_state("clip_score_sum", torch.tensor(0.0, dtype=torch.float64), "sum")
        counts = ["clip_score_count", "all_right", "labelled"]
        counts += [f"{name}_{count}" for name in self.tasks for count in ("right", "known")]
        for name in counts:  # a new tensor each: add_state keeps the one it is given
            self.add_state(name, torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    # -- features ---------------------------------------------------------------------------------
    def _features(self, holder: Frozen, images: torch.Tensor) -> torch.Tensor:
        """holder's module on images, in fp32 (no autocast), in batches of batch_size."""
        module = holder.on(images.device)
        with torch.no_grad(), torch.autocast(images.device.type, enabled=False):
            return torch.cat([module(chunk) for chunk in images.split(self.batch_size)])

    def add_reference(self, images: torch.Tensor) -> None:
        """Reference (e.g. validation) images for FD and KID; ignored after freeze_reference()."""
        if self.reference_frozen or self.kind is None:
            return
        features = self._features(self._extractor, images)
        self.fd.update(features, real=True)
        self.kid.update(features, real=True)
        self._computed = None

    def freeze_reference(self) -> None:
        """The reference is complete: later add_reference calls are ignored (a per-run reference)."""
        self.reference_frozen = True

    # -- generated images ------------------------------------------------------------------------
    def update(
        self,
        images: torch.Tensor,
        prompts: Sequence[str] | None = None,
        labels: Sequence[Mapping] | None = None,
    ) -> None:
        """images: N x 3 x H x W in [-1, 1]; prompts[i] / labels[i] (e.g. {"shape": "circle"}):
        what image i was generated for (None: no clip_score / accuracy for these images)."""
        scored = prompts is not None or (labels is not None and bool(self.tasks))
        scored = scored and self._clip.module is not None
        clip_features = None  # unnormalised: what "clip" FD and KID are defined on
        if scored or self.kind == "clip":
            clip_features = self._features(self._clip_images, images)
        if self.kind is not None:
            features = clip_features if self.kind == "clip" else None
            if features is None:
                features = self._features(self._extractor, images)
            self.fd.update(features, real=False)
            self.kid.update(features, real=False)
        if scored:
            directions = F.normalize(clip_features, dim=-1)
            if prompts is not None:
                self._update_clip_score(directions, prompts)
            if labels is not None and self.tasks:
                self._update_accuracy(directions, labels)

    def _update_clip_score(self, image_features: torch.Tensor, prompts: Sequence[str]) -> None:
        if len(prompts) != len(image_features):
            raise ValueError(f"{len(image_features)} images but {len(prompts)} prompts")
        model = self._clip.on(image_features.device)
        tokens = self.tokenizer(list(prompts)).to(image_features.device)
        with torch.no_grad(), torch.autocast(image_features.device.type, enabled=False):
            text = model.encode_text(tokens, normalize=True).float()
        self.clip_score_sum += (image_features * text).sum(dim=-1).double().sum()
        self.clip_score_count += len(prompts)

    def _update_accuracy(self, image_features: torch.Tensor, labels: Sequence[Mapping]) -> None:
        """Per task: right/known counts; an image counts as right overall when every task its
        labels name is right (what ldm_train.metrics.prompt_accuracy.prompt_accuracy reports)."""
        device = image_features.device
        correct = torch.ones(len(labels), dtype=torch.bool, device=device)
        labelled = torch.zeros(len(labels), dtype=torch.bool, device=device)
        for name, task in self.tasks.items():
            target = task.labels(labels).to(device)
            known = target != IGNORE_LABEL
            right = (image_features @ self._classifier(name, device)).argmax(dim=1) == target
            setattr(self, f"{name}_right", getattr(self, f"{name}_right") + (right & known).sum())
            setattr(self, f"{name}_known", getattr(self, f"{name}_known") + known.sum())
            correct &= right | ~known
            labelled |= known
        self.all_right += (correct & labelled).sum()
        self.labelled += labelled.sum()

    def _classifier(self, name: str, device: torch.device) -> torch.Tensor:
        """The task's E x C zero-shot weights, built once per device."""
        cached = self._classifiers.get(name)
        if cached is None or cached.device != device:
            model = self._clip.on(device)
            with torch.no_grad(), torch.autocast(device.type, enabled=False):
                cached = self.tasks[name].classifier(model, self.tokenizer, device).float()
            self._classifiers[name] = cached
        return cached

    # -- results ----------------------------------------------------------------------------------
    def compute(self) -> dict[str, torch.Tensor]:
        results: dict[str, torch.Tensor] = {}
        if self.kind is not None:
            results[FD_NAMES[self.kind]] = self.fd.compute()
            kid_mean, kid_std = self.kid.compute()
            results[KID_NAMES[self.kind]] = kid_mean
            results[f"{KID_NAMES[self.kind]}_std"] = kid_std
        if self.clip_score_count > 0:
            results["clip_score"] = (self.clip_score_sum / self.clip_score_count).float()
        for name in self.tasks:
            known = getattr(self, f"{name}_known")
            if known > 0:
                results[f"{name}_acc"] = getattr(self, f"{name}_right").float() / known
        if self.labelled > 0:
            results["accuracy"] = self.all_right.float() / self.labelled
        return results

    def reset(self) -> None:
        """Drops the generated images' states; the reference stays (computed once per run)."""
        super().reset()
        if self.fd is not None:
            self.fd.reset()
            self.kid.reset()
