"""Sample metrics in the stages' validation: which CLIP and features measure (MetricOptions), the
U-Net's validation samples (ValidationDraws) and the VAE's reconstruction distances
(ReconstructionMetrics).

Every k-th U-Net validation draws a grid (samples_per_prompt images for each of data.prompts, else
of the first captions of the validation shards) and one image for each of the first metric_images
captions of the validation shards, which the metrics measure against the first validation images
(the same captions: FD and KID compare like with like; FD of a set for fixed prompts against the
whole validation set does not fall as the model learns). The ranks draw together: each generates
its block of the images, padded so that every rank runs the same forward passes (under FSDP each
one is collective), measures its own (SampleMetrics sums and gathers across ranks), and the blocks
are gathered, in order, for the grid. The reference features are computed once per run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, ListConfig, OmegaConf

from ldm_train.data.stream import LoaderConfig
from ldm_train.diffusion.sampler import SamplingOptions, per_prompt
from ldm_train.diffusion.sizes import caption_sizes
from ldm_train.errors import UserError
from ldm_train.formats.clip_model import is_clip_folder
from ldm_train.metrics.features import FeatureKind, to_uint8
from ldm_train.metrics.reference import (
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
class ValidationOptions:
    """What a U-Net validation measures (config stage.module.validation): val/mse at `timesteps`
    evenly spaced timesteps with fixed noise, and what it draws, at every every_n_validations-th
    validation (0: never), with `sampling` (also the export's sampling defaults): a grid of samples_per_prompt images (0: no samples at all) for each prompt
    (data.prompts; none: the first max_prompts captions of the validation shards), and, for the
    metrics (None: the grid only), one image for each of the first metric_images captions of the
    validation shards, measured against the first max_reference validation images: generated and
    reference images of the same captions, so that FD and KID compare like with like."""

    prompts: Sequence[Any] | None = None
    max_prompts: int = 8
    samples_per_prompt: int = 2
    every_n_validations: int = 1
    metric_images: int = 32
    max_reference: int = 256
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    metrics: MetricOptions | None = None
    timesteps: int = 5

    def __post_init__(self) -> None:
        if isinstance(self.prompts, DictConfig | ListConfig):
            self.prompts = OmegaConf.to_container(self.prompts, resolve=True)
        # data.prompts entries may carry a width and a height (ldm_train.diffusion.sizes)
        self.sizes = caption_sizes(self.prompts or [])
        self.prompts = prompt_labels(self.prompts or [])[0]
        if isinstance(self.sampling, Mapping):
            self.sampling = SamplingOptions(**self.sampling)
        self.metrics = MetricOptions.parse(self.metrics)
        least = {
            "max_prompts": 1,
            "samples_per_prompt": 0,
            "every_n_validations": 0,
            "timesteps": 1,
        }
        for name, low in (least | {"metric_images": 2, "max_reference": 2}).items():
            if getattr(self, name) < low:
                raise UserError(
                    f"stage.module.validation.{name}={getattr(self, name)}; need >= {low}"
                )

    @classmethod
    def parse(cls, options: ValidationOptions | Mapping | None) -> ValidationOptions:
        """From the config's mapping (or as given)."""
        return options if isinstance(options, cls) else cls(**(options or {}))


class ValidationDraws:
    """What a run's validations draw: the grid's prompts, the captions the metrics measure,
    the reference, the metrics, the validation count. Shared by every copy of the stage
    (deepcopy, e.g. the EMA's, returns it)."""

    def __init__(self, options: ValidationOptions):
        self.options = options
        self.prompts: list[str] = list(options.prompts)  # the grid's
        self.measured: list[str] = []  # the captions the metrics measure, one image each
        self.labels: list[dict] = []  # their sample json (zero-shot labels)
        self.metrics: SampleMetrics | None = None
        self.reference: tuple[list[str], LoaderConfig] | None = None
        self.conditional = True
        self.validations = 0  # validations so far (not sanity checks); in checkpoints
        self.drawn = 0  # images the latest draw made (all ranks, padding left out)

    def __deepcopy__(self, memo: dict) -> ValidationDraws:
        return self

    @property
    def on(self) -> bool:
        return self.options.every_n_validations > 0 and self.options.samples_per_prompt > 0

    def prepare(
        self, val_urls: Sequence[str] | None, loader: LoaderConfig | None, conditional: bool
    ) -> None:
        """Every rank, alike (e.g. in setup): the prompts and captions, the reference, the metrics."""
        self.conditional = conditional
        options = self.options
        if not self.on:
            return
        if val_urls and loader is not None:
            self.reference = (list(val_urls), replace(loader, val_batch_size=READ_BATCH))
        wanted = options.metric_images if options.metrics is not None else 0
        if self.reference is not None and (wanted or not self.prompts):
            first = read_validation(*self.reference, limit=max(wanted, options.max_prompts))
            self.prompts = self.prompts or first.captions[: options.max_prompts]
            self.measured, self.labels = first.captions[:wanted], first.metas[:wanted]
        if self.measured:
            self.metrics = options.metrics.build("stage.module.validation.metrics")
        if self.metrics is None:
            self.measured, self.labels = [], []  # nothing to measure them with: not drawn
        source = "data.prompts" if options.prompts else "captions of data.val_urls"
        measured = f"{len(self.measured)} captions of data.val_urls" if self.metrics else "none"
        info(
            "validation samples: a grid of %d prompts (%s) x %d; metrics on: %s",
            len(self.prompts),
            source,
            options.samples_per_prompt,
            measured,
        )

    def due(self) -> bool:
        """Counts a validation; True if this one draws samples."""
        self.validations += 1
        every = self.options.every_n_validations
        return self.on and bool(self.prompts) and self.validations % every == 0

    def draw(
        self, sample_fn: SampleFn, rank: int, world_size: int, gather: Gather, device: torch.device
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """On every rank: the grid's and the metrics' images (one image per caption and seed:
        drawn once if both want it), this rank's share generated and measured. Returns the grid's
        images (prompt-major, 8-bit, gathered on every rank) and the figures (alike)."""
        seed, n = self.options.sampling.seed, self.options.samples_per_prompt
        grid = list(zip(*per_prompt(self.prompts, n, seed), strict=True))
        measured = [(caption, seed) for caption in self.measured]
        items = list(dict.fromkeys(grid + measured))  # (caption, seed): what an image depends on
        position = {item: i for i, item in enumerate(items)}
        self.drawn = len(items)
        prompts, seeds = [c for c, _ in items], [s for _, s in items]
        images, indices, own = sample_share(sample_fn, prompts, seeds, rank, world_size)
        figures = {}
        if self.metrics is not None:
            row = {item: i for i, item in enumerate(indices[:own])}
            # In item order on every rank: gathered rank by rank, that is one process's order.
            order = sorted((position[key], e) for e, key in enumerate(measured))
            entries = [(row[k], e) for k, e in order if k in row]
            figures = self.measure(images, entries, device, rank, world_size)
        # Only the grid's images travel: its items come first, so they are a prefix of the blocks.
        in_grid, block = len(dict.fromkeys(grid)), len(indices)
        sent = to_uint8(images[: min(block, in_grid)]).to(device)
        gathered = assemble(gather(sent), in_grid, block)
        return gathered[[position[key] for key in grid]].cpu(), figures

    def measure(
        self,
        images: torch.Tensor,
        entries: list[tuple[int, int]],
        device: torch.device,
        rank: int,
        world: int,
    ) -> dict[str, torch.Tensor]:
        """entries: (row of images, index into the measured captions) of this rank's own."""
        metrics = self.metrics.to(device)
        self.add_reference(device, rank, world)
        if entries:  # a rank may have none (fewer images than ranks)
            rows, which = (list(column) for column in zip(*entries, strict=True))
            prompts = [self.measured[e] for e in which] if self.conditional else None
            labels = [self.labels[e] for e in which] if any(self.labels) else None
            metrics.update(images[rows].to(device), prompts, labels)
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
