"""The denoiser's export: one folder a user copies anywhere and generates from, with
`python -m ldm_train.generate` or diffusers' StableDiffusionPipeline (a U-Net) or
StableDiffusion3Pipeline (a transformer; ldm_train.diffusion.model_index). stage=unet writes it at
the end of a run (`python -m ldm_train.export` from any checkpoint); generate, the chain and the
stage's validation samples all go through the one Pipeline object this module writes and reads.

    export/
      model_index.json          diffusers' index: the folder is a StableDiffusionPipeline (or a
                                StableDiffusion3Pipeline)
      unet/ or transformer/     UNet2DConditionModel or SD3Transformer2DModel (the EMA weights)
      scheduler/                the scheduler of the default sampler (sampling.sampler), built from
                                the training scheduler's config as generate builds it (flow:
                                FlowMatchEulerDiscreteScheduler)
      vae/                      AutoencoderKL; absent in pixel space
      text_encoder/ tokenizer/  transformers CLIPTextModel + CLIPTokenizer whose last_hidden_state is
                                what the U-Net attends to (a penultimate layer is built in: its
                                text_layer is "last"); absent for an unconditional U-Net
      ldm_train_pipeline.json   what diffusers has no place for: the image size, the sampling
                                defaults, the prompts, the training scheduler's config; and where
                                the parts are (folders inside this one)

Both pipelines need a VAE and a text encoder: a pixel-space or unconditional export is
ldm_train's own format (the same folder without model_index.json; generate reads it), and so is one
whose open_clip text tower a CLIPTextModel cannot hold (its CLIP folder is copied instead).
Folders exported before model_index.json (no train_scheduler in the index) hold the training
scheduler in scheduler/ and an open_clip folder in text_encoder/, read at the index's text_layer:
load reads those too.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from ldm_train.atomic import write_folder
from ldm_train.diffusion.conditioning import TextEncoder
from ldm_train.diffusion.denoiser import Denoiser, is_transformer
from ldm_train.diffusion.model_index import (
    diffusers_problem,
    pipeline_class,
    pipeline_vae,
    write_model_index,
)
from ldm_train.diffusion.sampler import (
    MAX_SIDE,
    SamplingOptions,
    latent_shape,
    per_prompt,
    sample,
)
from ldm_train.diffusion.schedule import TRAIN_SCHEDULERS, build_sampler
from ldm_train.diffusion.text_encoder import (
    ClipTextEncoder,
    TransformersTextEncoder,
    load_text_encoder,
)
from ldm_train.errors import UserError, reading
from ldm_train.formats import lora_file
from ldm_train.formats.transformers_clip import (
    TEXT_ENCODER_DIR,
    TOKENIZER_DIR,
    load_text_encoder_folders,
    save_text_encoder,
)
from ldm_train.formats.vae_folder import vae_scale_factor
from ldm_train.rules import Int
from ldm_train.safety import check_safetensors

log = logging.getLogger(__name__)

INDEX = "ldm_train_pipeline.json"
MODEL_INDEX = StableDiffusionPipeline.config_name  # model_index.json
SCHEDULER_CONFIG = SchedulerMixin.config_name  # scheduler_config.json
PARTS = ("unet", "transformer", "scheduler", "vae", TEXT_ENCODER_DIR, TOKENIZER_DIR)
INDEX_RULES = {"image_size": Int(1, MAX_SIDE)}
# Weights from disk, safetensors only: a pickled .bin is never opened (nor its warnings printed).
SAFE = {"local_files_only": True, "use_safetensors": True}


@dataclass
class Pipeline:
    """The parts that turn prompts into images, and the defaults to do it with."""

    unet: Denoiser  # the denoiser: a UNet2DConditionModel or an SD3Transformer2DModel
    scheduler: SchedulerMixin  # the training noise scheduler (its config: betas, prediction type)
    vae: AutoencoderKL | None
    text_encoder: TextEncoder | None
    image_size: int
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    prompts: list[str] = field(default_factory=list)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        side = self.image_size // vae_scale_factor(self.vae)
        return (self.unet.config.in_channels, side, side)

    def generate(
        self,
        prompts: Sequence[str],
        n: int,
        options: SamplingOptions | None = None,
        size: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """n images per prompt (prompt-major) in [-1, 1]; image j from seed options.seed + j; at
        size = (width, height), multiples of the VAE's factor (default: image_size square).
        The U-Net runs in eval mode and is put back as it was."""
        options = options or self.sampling
        shape = self.latent_shape if size is None else latent_shape(self.unet, self.vae, size)
        repeated, seeds = per_prompt(prompts, n, options.seed)
        was_training = self.unet.training
        self.unet.eval()
        try:
            return sample(
                self.unet,
                dict(self.scheduler.config),
                repeated,
                seeds,
                shape,
                options,
                vae=self.vae,
                text_encoder=self.text_encoder,
            )
        finally:
            self.unet.train(was_training)

    def add_loras(self, loras: Sequence[lora_file.LoraSpec]) -> None:
        """LoRA adapters on the U-Net and the text encoder (a transformers CLIPTextModel), each at
        its scale, all active (ldm_train.formats.lora_file); fuse_loras merges them in."""
        lora_file.apply_loras(loras, self.unet, self.text_model)

    def fuse_loras(self) -> None:
        lora_file.fuse_loras(self.unet, self.text_model)

    @property
    def text_model(self) -> torch.nn.Module | None:
        """The text encoder's transformers model (where an adapter of it goes), or None."""
        is_transformers = isinstance(self.text_encoder, TransformersTextEncoder)
        return self.text_encoder.model if is_transformers else None

    def save(self, out_dir: str | Path) -> Path:
        """Write the folder (see the module docstring); returns it. It is written beside and
        moved into place whole (ldm_train.atomic): an earlier export there is replaced, a folder
        of someone else's files refused."""
        return write_folder(out_dir, self.write, "unet export", "the export folder", (INDEX,))

    def write(self, out_dir: Path) -> Path:
        """The folder's content, into an empty folder."""
        sampler = export_sampler(self.sampling.sampler, self.scheduler.config, self.vae is None)
        net_dir = "transformer" if is_transformer(self.unet) else "unet"
        # diffusers draws sample_size latents by default: the training size's (a pretrained or
        # earlier net carries the size it was made for; a resolution stage changed it).
        self.unet.register_to_config(sample_size=self.latent_shape[-1])
        self.unet.save_pretrained(out_dir / net_dir)
        sampler.save_pretrained(out_dir / "scheduler")
        vae = pipeline_vae(self.unet, self.vae) if self.vae is not None else None
        if vae is not None:
            vae.save_pretrained(out_dir / "vae")
        text_index, converted = write_text_encoder(self.text_encoder, out_dir)
        problem = diffusers_problem(self.unet, self.vae, self.text_encoder, converted)
        if problem is None:
            write_model_index(out_dir, self.unet, vae, sampler, converted)
        index = {
            net_dir: net_dir,
            "scheduler": "scheduler",
            "vae": "vae" if self.vae is not None else None,
            **text_index,
            "image_size": self.image_size,
            "sampling": dataclasses.asdict(self.sampling),
            "prompts": self.prompts,
            "train_scheduler": json.loads(self.scheduler.to_json_string()),
        }
        (out_dir / INDEX).write_text(json.dumps(index, indent=2))
        what, kind = type(self.unet).__name__, pipeline_class(self.unet).__name__
        if problem is None:
            log.info("exported the %s as a diffusers %s to %s", what, kind, out_dir)
        else:
            log.info(
                "exported the %s to %s in ldm_train's own format (python -m ldm_train.generate "
                "reads it), not as a diffusers %s: %s",
                what,
                out_dir,
                kind,
                problem,
            )
        return out_dir

    @classmethod
    def load(cls, export_dir: str | Path, device: str | torch.device = "cpu") -> Pipeline:
        """Read a folder written by save (or by save before model_index.json), onto `device`, in
        eval mode."""
        export_dir = Path(export_dir)
        index = read_index(export_dir)
        with reading(export_dir, " (a broken or half-written export? export it again)"):
            parts = {name: part_folder(export_dir, index, name) for name in PARTS}
            for name in ("unet", "transformer", "vae"):
                if parts[name] is not None:
                    check_safetensors(parts[name], f"{export_dir}: {name}")
            vae = None
            if parts["vae"] is not None:
                vae = AutoencoderKL.from_pretrained(parts["vae"], **SAFE)
            text_encoder = read_text_encoder(parts, index.get("text_layer") or "last")
            unet = read_denoiser(export_dir, parts)
            scheduler = train_scheduler(index, parts["scheduler"])
            return cls(
                unet=unet.to(device).eval(),
                scheduler=scheduler,
                vae=vae.to(device).eval() if vae is not None else None,
                text_encoder=text_encoder.to(device) if text_encoder is not None else None,
                image_size=index["image_size"],
                sampling=SamplingOptions.from_record(index["sampling"], str(export_dir / INDEX)),
                prompts=index["prompts"],
            )


def read_denoiser(export_dir: Path, parts: dict[str, Path | None]) -> Denoiser:
    """unet/ (UNet2DConditionModel) or transformer/ (SD3Transformer2DModel), from disk only."""
    if parts["unet"] is not None:
        return UNet2DConditionModel.from_pretrained(parts["unet"], **SAFE)
    if parts["transformer"] is not None:
        return SD3Transformer2DModel.from_pretrained(parts["transformer"], **SAFE)
    raise UserError(f"{export_dir / INDEX} names no unet or transformer folder")


def export_sampler(name: str, train_config: dict, pixel_space: bool) -> SchedulerMixin:
    """The scheduler/ of the export: the sampler generate builds by default. steps_offset=1 is SD's
    value: the trailing spacing build_sampler sets ignores it, and StableDiffusionPipeline
    rewrites any other value (with a deprecation warning)."""
    sampler = build_sampler(name, train_config, pixel_space)
    if "steps_offset" in sampler.config:  # not a flow scheduler's option
        sampler.register_to_config(steps_offset=1)
    return sampler


def write_text_encoder(
    text_encoder: TextEncoder | None, out_dir: Path
) -> tuple[dict, tuple | str | None]:
    """(its index entries, (CLIPTextModel, CLIPTokenizer) or why a CLIPTextModel cannot hold it).
    text_encoder/ + tokenizer/ in transformers' format, or else the open_clip folder it came from."""
    if text_encoder is None:
        return {"text_encoder": None, "tokenizer": None, "text_layer": None}, None
    try:
        converted = text_encoder.to_transformers()
    except UserError as error:
        source = text_encoder.source_dir if isinstance(text_encoder, ClipTextEncoder) else None
        if source is None:
            raise UserError(f"cannot export the text encoder: {error}") from error
        shutil.copytree(source, out_dir / TEXT_ENCODER_DIR)
        entries = {"text_encoder": TEXT_ENCODER_DIR, "tokenizer": None}
        return {**entries, "text_layer": text_encoder.layer}, str(error)
    save_text_encoder(*converted, out_dir)
    entries = {"text_encoder": TEXT_ENCODER_DIR, "tokenizer": TOKENIZER_DIR, "text_layer": "last"}
    return entries, converted


def read_index(export_dir: Path) -> dict:
    """The export's index, checked field by field (a file is data: ldm_train.safety)."""
    index_file = export_dir / INDEX
    if not index_file.is_file():
        raise UserError(
            f"no {INDEX} in {export_dir}: point at the export folder of a unet run "
            "(e.g. outputs/<experiment>/unet/export; `python -m ldm_train stage=unet` makes it)"
        )
    with reading(index_file, " (export the run again)"):
        index = json.loads(index_file.read_text(encoding="utf-8"))
    if not isinstance(index, dict):
        raise UserError(f"{index_file} is not an export index (a JSON object)")
    INDEX_RULES["image_size"].check(f"{index_file}: image_size", index.get("image_size"))
    prompts = index.setdefault("prompts", []) or []
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise UserError(f"{index_file}: prompts must be a list of strings")
    index["prompts"], index["sampling"] = prompts, index.get("sampling") or {}
    return index


def part_folder(export_dir: Path, index: dict, name: str) -> Path | None:
    """Where the index says a part is; inside the export folder, never elsewhere on disk."""
    relative = index.get(name)
    if not relative:
        if name == "scheduler":
            raise UserError(f"{export_dir / INDEX} names no {name} folder")
        return None
    folder = (export_dir / relative).resolve()
    if not folder.is_relative_to(export_dir.resolve()) or not folder.is_dir():
        raise UserError(
            f"{export_dir / INDEX}: {name}={relative!r} is not a folder inside the export folder"
        )
    return folder


def pipeline_part(path: str | Path, name: str) -> Path | None:
    """The folder of a part (unet, vae, ...) of a pipeline folder: an export (by its index) or any
    diffusers pipeline (model_index.json; parts in subfolders of their names); None if there is
    no such part or path is no pipeline folder."""
    path = Path(path)
    if (path / INDEX).is_file():
        return part_folder(path, read_index(path), name)
    if (path / MODEL_INDEX).is_file() and (path / name).is_dir():
        return path / name
    return None


def read_text_encoder(parts: dict[str, Path | None], layer: str) -> TextEncoder | None:
    """transformers' text_encoder/ + tokenizer/, or (exports before model_index.json, or a tower a
    CLIPTextModel cannot hold) an open_clip folder in text_encoder/."""
    if parts[TEXT_ENCODER_DIR] is None:
        return None
    if parts[TOKENIZER_DIR] is None:
        return load_text_encoder(parts[TEXT_ENCODER_DIR], layer)
    model, tokenizer = load_text_encoder_folders(parts[TEXT_ENCODER_DIR], parts[TOKENIZER_DIR])
    return TransformersTextEncoder(model, tokenizer, layer)


def train_scheduler(index: dict, scheduler_dir: Path) -> SchedulerMixin:
    """The training noise scheduler: its config in the index (before model_index.json,
    scheduler/ held it)."""
    config = index.get("train_scheduler")
    if config is None:
        config = json.loads((scheduler_dir / SCHEDULER_CONFIG).read_text())
    return train_scheduler_class(config).from_config(config)


def train_scheduler_class(config: dict) -> type[SchedulerMixin]:
    """The scheduler class a scheduler config names, from the ones stage=unet trains with."""
    classes = [*TRAIN_SCHEDULERS.values(), FlowMatchEulerDiscreteScheduler]
    by_name = {cls.__name__: cls for cls in classes}
    name = config.get("_class_name")
    if name not in by_name:
        raise UserError(
            f"scheduler {name!r} is not one stage=unet trains with ({', '.join(by_name)})"
        )
    return by_name[name]
