"""The U-Net's export: one folder a user copies anywhere and generates from. stage=unet writes it at
the end of a run (`python -m ldm_train.export` from any checkpoint); `generate`, the chain and the
stage's validation samples all go through the one Pipeline object this module writes and reads.

    export/
      unet/                     the U-Net, diffusers format (the EMA weights after training)
      scheduler/                the training noise scheduler, whose config the samplers start from
      vae/                      the VAE (diffusers AutoencoderKL); absent in pixel space
      text_encoder/             the text encoder's CLIP folder (ldm_train.exports.clip); absent
                                for an unconditional U-Net
      ldm_train_pipeline.json   the index: where those are, the text layer, the image size, the
                                sampling defaults and the validation prompts
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
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from ldm_train.config import UserError
from ldm_train.diffusion.sampler import SamplingOptions, per_prompt, sample
from ldm_train.diffusion.schedule import TRAIN_SCHEDULERS
from ldm_train.diffusion.upstream import TextEncoder, vae_scale_factor

log = logging.getLogger(__name__)

INDEX = "ldm_train_pipeline.json"
PARTS = ("unet", "scheduler", "vae", "text_encoder")


@dataclass
class Pipeline:
    """The parts that turn prompts into images, and the defaults to do it with."""

    unet: UNet2DConditionModel
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
        self, prompts: Sequence[str], n: int, options: SamplingOptions | None = None
    ) -> torch.Tensor:
        """n images per prompt (prompt-major) in [-1, 1]; image j from seed options.seed + j.
        The U-Net runs in eval mode and is put back as it was."""
        options = options or self.sampling
        repeated, seeds = per_prompt(prompts, n, options.seed)
        was_training = self.unet.training
        self.unet.eval()
        try:
            return sample(
                self.unet,
                dict(self.scheduler.config),
                repeated,
                seeds,
                self.latent_shape,
                options,
                vae=self.vae,
                text_encoder=self.text_encoder,
            )
        finally:
            self.unet.train(was_training)

    def save(self, out_dir: str | Path) -> Path:
        """Write the folder (see the module docstring); returns it."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self.unet.save_pretrained(out_dir / "unet")
        self.scheduler.save_pretrained(out_dir / "scheduler")
        if self.vae is not None:
            self.vae.save_pretrained(out_dir / "vae")
        if self.text_encoder is not None:
            source = getattr(self.text_encoder, "source_dir", None)
            if source is None:
                raise UserError("the text encoder has no source_dir (its CLIP folder) to copy")
            shutil.copytree(source, out_dir / "text_encoder", dirs_exist_ok=True)
        index = {
            "unet": "unet",
            "scheduler": "scheduler",
            "vae": "vae" if self.vae is not None else None,
            "text_encoder": "text_encoder" if self.text_encoder is not None else None,
            "text_layer": getattr(self.text_encoder, "layer", None),
            "image_size": self.image_size,
            "sampling": dataclasses.asdict(self.sampling),
            "prompts": self.prompts,
        }
        (out_dir / INDEX).write_text(json.dumps(index, indent=2))
        log.info("exported the U-Net pipeline to %s", out_dir)
        return out_dir

    @classmethod
    def load(cls, export_dir: str | Path, device: str | torch.device = "cpu") -> Pipeline:
        """Read a folder written by save, onto `device`, in eval mode."""
        from ldm_train.text_encoder import load_text_encoder

        export_dir = Path(export_dir)
        index = read_index(export_dir)
        parts = {name: part_folder(export_dir, index, name) for name in PARTS}
        scheduler_config = json.loads((parts["scheduler"] / "scheduler_config.json").read_text())
        vae = AutoencoderKL.from_pretrained(parts["vae"]) if parts["vae"] else None
        text_encoder = None
        if parts["text_encoder"]:
            text_encoder = load_text_encoder(
                parts["text_encoder"], index.get("text_layer") or "last"
            )
        return cls(
            unet=UNet2DConditionModel.from_pretrained(parts["unet"]).to(device).eval(),
            scheduler=train_scheduler_class(scheduler_config).from_config(scheduler_config),
            vae=vae.to(device).eval() if vae is not None else None,
            text_encoder=text_encoder.to(device) if text_encoder is not None else None,
            image_size=index["image_size"],
            sampling=SamplingOptions(**index.get("sampling", {})),
            prompts=list(index.get("prompts") or []),
        )


def read_index(export_dir: Path) -> dict:
    index_file = export_dir / INDEX
    if not index_file.is_file():
        raise UserError(
            f"no {INDEX} in {export_dir}: point at the export folder of a unet run "
            "(e.g. outputs/<experiment>/unet/export; `python -m ldm_train stage=unet` makes it)"
        )
    return json.loads(index_file.read_text())


def part_folder(export_dir: Path, index: dict, name: str) -> Path | None:
    """Where the index says a part is; inside the export folder, never elsewhere on disk."""
    relative = index.get(name)
    if not relative:
        if name in ("unet", "scheduler"):
            raise UserError(f"{export_dir / INDEX} names no {name} folder")
        return None
    folder = (export_dir / relative).resolve()
    if not folder.is_relative_to(export_dir.resolve()) or not folder.is_dir():
        raise UserError(
            f"{export_dir / INDEX}: {name}={relative!r} is not a folder inside the export folder"
        )
    return folder


def train_scheduler_class(config: dict) -> type[SchedulerMixin]:
    """The scheduler class a scheduler_config.json names, from the ones stage=unet trains with."""
    by_name = {cls.__name__: cls for cls in TRAIN_SCHEDULERS.values()}
    name = config.get("_class_name")
    if name not in by_name:
        raise UserError(
            f"scheduler {name!r} is not one stage=unet trains with ({', '.join(by_name)})"
        )
    return by_name[name]
