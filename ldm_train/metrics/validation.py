"""Sample metrics in the stages' validation: which CLIP and features measure (MetricOptions), the
U-Net's validation samples (ValidationSamples) and the VAE's reconstruction distances
(ReconstructionMetrics).

Every k-th U-Net validation draws n images for each prompt (data.prompts, else the first captions of
the validation shards, read alike on every rank) with all ranks together: each generates its share,
padded so that every rank runs the same forward passes (under FSDP each one is collective), and
measures it (SampleMetrics sums and gathers across ranks); the shares are then gathered, in order,
for the grid. The reference features (the first validation images) are computed once per run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_only

from ldm_train.config import UserError
from ldm_train.data.pipeline import LoaderConfig
from ldm_train.diffusion.sampler import SamplingOptions, per_prompt
from ldm_train.exports.clip import is_clip_folder
from ldm_train.metrics.features import FeatureKind, to_uint8
from ldm_train.metrics.reference import (
    choose_prompts,
    prompt_labels,
    read_validation,
    validation_batches,
)
from ldm_train.metrics.sample import SampleMetrics, build_sample_metrics
from ldm_train.metrics.share import SampleFn, assemble, rank_share, sample_share

log = logging.getLogger(__name__)

READ_BATCH = 64  # validation images decoded (and measured) at a time
Gather = Callable[[torch.Tensor], torch.Tensor]  # every rank's tensor, stacked: world x ...


def info(message: str, *args: Any) -> None:
    if rank_zero_only.rank == 0:  # every rank decides alike; one says so
        log.info(message, *args)


@dataclass
class MetricOptions:
    """What a validation measures its images with: `clip`, an open_clip folder (clip_score,
    zero-shot accuracy with data.zero_shot, and "clip" features); `features`, the extractor of FD
    and KID ("clip" | "inception" with inception_weights, a file on disk | None: no distances)."""

    clip: str | None = None
    features: FeatureKind | None = "clip"
    inception_weights: str | None = None
    zero_shot: Mapping | None = None
    batch_size: int = 64

    @classmethod
    def parse(cls, options: MetricOptions | Mapping | None) -> MetricOptions | None:
        return options if options is None or isinstance(options, cls) else cls(**options)

    def build(self, option: str, distances: bool = True) -> SampleMetrics | None:
        """The SampleMetrics asked for. What needs a CLIP is off, with one log line, when `clip` is
        no open_clip folder (stage.text_encoder a transformers folder, a CLIP not exported yet);
        distances=False: no reference images. None when nothing is left to measure."""
        features = self.features if distances else None
        clip = str(self.clip) if self.clip and is_clip_folder(self.clip) else None
        if clip is None:
            info(
                "%s.clip=%s is no open_clip folder: the metrics needing a CLIP are off",
                option,
                self.clip,
            )
            features = None if features == "clip" else features
        if clip is None and features is None:
            return None
        return build_sample_metrics(
            clip,
            features,
            self.inception_weights,
            zero_shot=self.zero_shot,
            batch_size=self.batch_size,
        )


@dataclass
class SampleOptions:
    """What a U-Net validation draws: samples_per_prompt images for each prompt (data.prompts;
    none: the first max_prompts captions of the validation shards), at every every_n_validations-th
    validation (0: never), with `sampling`; measured with `metrics` (None: the grid only) against
    the first max_reference validation images."""

    prompts: Sequence[Any] | None = None
    max_prompts: int = 8
    samples_per_prompt: int = 4
    every_n_validations: int = 1
    max_reference: int = 256
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    metrics: MetricOptions | None = None
    labels: list[dict] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        self.prompts, self.labels = prompt_labels(self.prompts or [])
        if isinstance(self.sampling, Mapping):
            self.sampling = SamplingOptions(**self.sampling)
        self.metrics = MetricOptions.parse(self.metrics)
        least = {"max_prompts": 1, "samples_per_prompt": 0, "every_n_validations": 0}
        for name, low in (least | {"max_reference": 2}).items():
            if getattr(self, name) < low:
                raise UserError(
                    f"stage.module.validation.{name}={getattr(self, name)}; need >= {low}"
                )


class ValidationSamples:
    """The samples of a run's validations: prompts, reference, metrics, the validation count.
    Shared by every copy of the stage (deepcopy, e.g. the EMA's, returns it)."""

    def __init__(self, options: SampleOptions):
        self.options = options
        self.prompts, self.labels = list(options.prompts), list(options.labels)
        self.metrics: SampleMetrics | None = None
        self.reference: tuple[list[str], LoaderConfig] | None = None
        self.conditional = True
        self.validations = 0  # validations so far (not sanity checks); in checkpoints

    def __deepcopy__(self, memo: dict) -> ValidationSamples:
        return self

    @property
    def on(self) -> bool:
        return self.options.every_n_validations > 0 and self.options.samples_per_prompt > 0

    def prepare(
        self, val_urls: Sequence[str] | None, loader: LoaderConfig | None, conditional: bool
    ) -> None:
        """Every rank, alike (e.g. in setup): the prompts, where the reference is, the metrics."""
        self.conditional = conditional
        if not self.on:
            return
        if val_urls and loader is not None:
            self.reference = (list(val_urls), replace(loader, val_batch_size=READ_BATCH))
        if not self.prompts and self.reference is not None:
            validation = read_validation(*self.reference, limit=self.options.max_prompts)
            self.prompts, self.labels = choose_prompts(None, validation, self.options.max_prompts)
        options, n = self.options.metrics, self.options.samples_per_prompt
        if options is not None and self.prompts:
            option = "stage.module.validation.metrics"
            self.metrics = options.build(option, distances=self.reference is not None)
        if self.metrics is not None and self.metrics.kind and len(self.prompts) * n < 2:
            raise UserError(
                f"stage.module.validation: FD and KID need 2 or more images, {len(self.prompts)} "
                f"prompt(s) x samples_per_prompt={n} make fewer; raise either, or set "
                "stage.module.validation.metrics.features=null"
            )
        source = "data.prompts" if self.options.prompts else "captions of data.val_urls"
        info("validation samples: %d prompts (%s) x %d", len(self.prompts), source, n)

    def due(self) -> bool:
        """Counts a validation; True if this one draws samples."""
        self.validations += 1
        every = self.options.every_n_validations
        return self.on and bool(self.prompts) and self.validations % every == 0

    def draw(
        self, sample_fn: SampleFn, rank: int, world_size: int, gather: Gather, device: torch.device
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """On every rank: n images per prompt, this rank's share generated and measured. Returns
        every image (prompt-major, 8-bit, gathered on every rank) and the figures (alike)."""
        n = self.options.samples_per_prompt
        repeated, seeds = per_prompt(self.prompts, n, self.options.sampling.seed)
        images, indices, own = sample_share(sample_fn, repeated, seeds, rank, world_size)
        figures = {}
        if self.metrics is not None:
            figures = self.measure(images[:own], indices[:own], device, rank, world_size)
        gathered = gather(to_uint8(images).to(device))
        return assemble(gathered, len(repeated)).cpu(), figures

    def measure(
        self, images: torch.Tensor, indices: list[int], device: torch.device, rank: int, world: int
    ) -> dict[str, torch.Tensor]:
        metrics = self.metrics.to(device)
        self.add_reference(device, rank, world)
        n = self.options.samples_per_prompt
        if len(images):  # a rank may have none (fewer images than ranks)
            prompts = [self.prompts[i // n] for i in indices] if self.conditional else None
            labels = [self.labels[i // n] for i in indices] if any(self.labels) else None
            metrics.update(images.to(device), prompts, labels)
        figures = metrics.compute()  # sums and gathers every rank's states
        metrics.reset()  # the reference stays
        return figures

    def add_reference(self, device: torch.device, rank: int, world: int) -> None:
        """Once per run: this rank's share (rank_share's block) of the first max_reference images."""
        if self.metrics.reference_frozen or self.metrics.kind is None:
            return
        limit = self.options.max_reference
        indices, own = rank_share(limit, rank, world)
        mine, seen = set(indices[:own]), 0
        for batch in validation_batches(*self.reference, limit=limit):
            images = batch["image"]
            kept = [i for i in range(len(images)) if seen + i in mine]
            if kept:
                self.metrics.add_reference(images[kept].to(device))
            seen += len(images)
            if seen > max(mine, default=-1):
                break
        self.metrics.freeze_reference()

    def state_dict(self) -> dict:
        return {"validations": self.validations}

    def load_state_dict(self, state: Mapping) -> None:
        self.validations = int(state.get("validations", 0))


class ReconstructionMetrics:
    """The VAE's reconstruction distances (rFD, as latent diffusion reports for its autoencoders):
    its reconstructions of the validation images against the images, whose features are computed
    at the first validation and kept for the run. Shared by copies of the stage, like the above."""

    def __init__(self, options: MetricOptions | Mapping | None):
        self.options = MetricOptions.parse(options)
        self.metrics: SampleMetrics | None = None

    def __deepcopy__(self, memo: dict) -> ReconstructionMetrics:
        return self

    def prepare(self) -> None:
        if self.options is not None and self.metrics is None:
            self.metrics = self.options.build("stage.module.metrics")
            if self.metrics is not None and self.metrics.kind is None:
                self.metrics = None  # nothing but distances to measure reconstructions with

    def update(self, images: torch.Tensor, reconstructions: torch.Tensor) -> None:
        if self.metrics is not None:
            self.metrics.to(images.device).add_reference(images)  # ignored once frozen
            self.metrics.update(reconstructions.clamp(-1, 1))

    def compute(self, device: torch.device) -> dict[str, torch.Tensor]:
        """On every rank: {"rfd_clip", "rkid_clip", ...}; the reference is complete from here on."""
        if self.metrics is None:
            return {}
        metrics = self.metrics.to(device)  # a rank without validation images syncs from there too
        figures = {f"r{name}": value for name, value in metrics.compute().items()}
        self.metrics.reset()
        self.metrics.freeze_reference()
        return figures
