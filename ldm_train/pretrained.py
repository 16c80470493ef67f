"""Start a stage from existing weights: `model.pretrained=PATH` (null: the preset, randomly
initialised).

    stage=unet  a UNet2DConditionModel folder (config.json + weights), or a pipeline folder: its
                unet/ (Stable Diffusion's, or a stage=unet export), or a single-file checkpoint
                (.safetensors / .ckpt; its architecture: model.pretrained_config); with a
                transformer preset (model=unet/dit_*) an SD3Transformer2DModel folder or a
                pipeline's transformer/
    stage=vae   an AutoencoderKL folder, or a pipeline folder: its vae/, or a single file
    stage=clip  a CLIP export or open_clip hub folder (open_clip_config.json), NAME:FILE (open_clip's
                model card NAME and a weights file), or a weights file for the preset's model card

The architecture comes with the weights (a folder's config.json or open_clip_config.json, the card
NAME), and model.net's sizes are not used. A bare weights file has no config: it takes the preset's
(model=clip/ViT-H-14 for ViT-H-14 weights), and weights that do not fit it stop the run with one
line naming the first difference. Reading never runs code: safetensors, or torch files with
weights_only=True, from disk only.

The U-Net's noise schedule facts (prediction_type, betas, timesteps) come from the pretrained
pipeline's scheduler unless the config sets them: ${pretrained_schedule:KEY,DEFAULT} in the presets
and stage=unet's config (a resolver registered here), so an SD 2.x v-prediction model is fine-tuned
as v-prediction without being told.

The weights are loaded when the stage is built, so the first step starts from exactly them with a
fresh optimizer and data position (a new run directory, or resume=never); a resumed run loads its
checkpoint over them and continues from the checkpoint.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, SD3Transformer2DModel, UNet2DConditionModel
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from ldm_train.diffusion.denoiser import context_key
from ldm_train.diffusion.pipeline import pipeline_part
from ldm_train.diffusion.text_encoder import parse_named
from ldm_train.errors import UserError, reading
from ldm_train.formats.clip_model import (
    ClipNet,
    check_weights_fit,
    is_clip_folder,
    load_clip,
    load_named_clip,
    read_weights,
)
from ldm_train.formats.single_file import is_single_file, load_single_file, schedule_source
from ldm_train.safety import check_safetensors
from ldm_train.train import build

log = logging.getLogger(__name__)

FROM_DISK: dict[str, Any] = {
    "local_files_only": True,
    "use_safetensors": True,  # a pickled .bin is never opened
    "torch_dtype": torch.float32,
    # diffusers' default without accelerate installed warns, then loads as with False.
    "low_cpu_mem_usage": importlib.util.find_spec("accelerate") is not None,
}
OWN_CONFIG = "the architecture of its config; model.net's sizes are not used"
PRESET = "the preset's architecture"


@dataclass(frozen=True)
class Pretrained:
    """What model.pretrained loaded for a stage: the net (its architecture is the weights', not the
    preset's) and where it came from (checks name it; a LoRA export records it as its base)."""

    net: Any
    source: str


def unwrap(net: Any) -> tuple[Any, str | None]:
    """(net, model.pretrained's source) of what a stage is given: a Pretrained, or a net or preset
    (source None)."""
    return (net.net, net.source) if isinstance(net, Pretrained) else (net, None)


def unet_net(net: DictConfig, pretrained: str | None = None, config: str | None = None) -> Any:
    """stage=unet's net: the preset (a partial whose null sizes the stage fills from the VAE and
    the text encoder) or the denoiser of `pretrained` (config: a single file's architecture): a
    U-Net (unet/ of a pipeline folder), or, when the preset is a transformer (model=unet/dit_*),
    an SD3Transformer2DModel (transformer/)."""
    if pretrained is None:
        return build(net)
    transformer = get_class(net._target_) is SD3Transformer2DModel
    cls = SD3Transformer2DModel if transformer else UNet2DConditionModel
    return read_pretrained(cls, "transformer" if transformer else "unet", pretrained, config)


def vae_net(
    net: DictConfig, pretrained: str | None = None, config: str | None = None
) -> AutoencoderKL | Pretrained:
    """stage=vae's net: the preset's AutoencoderKL or the one of `pretrained`."""
    if pretrained is None:
        return build(net)
    return read_pretrained(AutoencoderKL, "vae", pretrained, config)


def read_pretrained(cls: type, part: str, pretrained: str, config: str | None) -> Pretrained:
    """A diffusers model from a folder (its own, or a pipeline's part) or a single file."""
    if is_single_file(pretrained):
        return marked(load_single_file(cls, pretrained, part, config), pretrained)
    folder = model_folder(pretrained, part, cls)
    return marked(read_model(cls, folder), folder)


def pretrained_schedule(key: str, default: Any, *, _root_: DictConfig) -> Any:
    """${pretrained_schedule:KEY,DEFAULT}: KEY of model.pretrained's scheduler (or of
    model.pretrained_config's), else DEFAULT; an override of the key itself wins over both."""
    pretrained = OmegaConf.select(_root_, "model.pretrained", default=None)
    config = OmegaConf.select(_root_, "model.pretrained_config", default=None)
    value = schedule_source(pretrained, config).get(key) if pretrained else None
    return default if value is None else value


OmegaConf.register_new_resolver("pretrained_schedule", pretrained_schedule, replace=True)


def clip_net(
    net: DictConfig, pretrained: str | None = None, context_length: int | None = None
) -> ClipNet | Pretrained:
    """stage=clip's net: the preset's CLIP (ldm_train.stages.clip.build_clip) or `pretrained`'s,
    each with its model card (what the stage exports). context_length: the stage's tokenizer's,
    which the text tower must read."""
    if pretrained is None:
        return build(net)
    named = parse_named(str(pretrained))
    with reading(f"model.pretrained={pretrained}"):
        if is_clip_folder(pretrained):
            loaded = load_clip(pretrained)
        elif named is not None:
            loaded = load_named_clip(*named)
        elif Path(pretrained).is_file():
            return marked(preset_with_weights(net, Path(pretrained)), pretrained, PRESET)
        else:
            raise UserError(
                f"model.pretrained={pretrained}: not a CLIP export or open_clip hub folder "
                "(open_clip_config.json), nor NAME:FILE, nor a weights file; stage=clip takes those"
            )
    if context_length is not None and loaded.model.context_length != context_length:
        raise UserError(
            f"model.pretrained={pretrained}: its text tower reads {loaded.model.context_length} "
            f"tokens, the tokenizer gives {context_length}: set "
            f"model.context_length={loaded.model.context_length}"
        )
    return marked(ClipNet(loaded.model, loaded.card), pretrained)


def preset_with_weights(net: DictConfig, weights: Path) -> ClipNet:
    """The preset's CLIP with the weights of a file made for the same card."""
    clip = build(net)
    state = read_weights(weights)
    check_weights_fit(clip.model.state_dict(), state, f"model.pretrained={weights}")
    clip.model.load_state_dict(state)
    return clip


def model_folder(path: str | Path, part: str, cls: type) -> Path:
    """The folder of a `cls` at path: path itself (its config.json names the class) or, for a
    pipeline folder, its `part` subfolder. One-line errors for anything else."""
    path = Path(path)
    folder = pipeline_part(path, part) or path
    config = folder / cls.config_name
    accepted = (
        f"stage={part} takes {cls.__name__} weights: their folder, a diffusers pipeline folder "
        f"(its {part}/) or a single file (.safetensors, .ckpt)"
    )
    if not config.is_file():
        found = "no config.json there" if path.exists() else "nothing there"
        raise UserError(f"model.pretrained={path}: {found} nor in {part}/; {accepted}")
    with reading(config):
        fields = json.loads(config.read_text())
    if not isinstance(fields, dict):
        raise UserError(f"model.pretrained={path}: {config} is not a model config (a JSON object)")
    name = fields.get("_class_name") or fields.get("model_type") or "model of another kind"
    if name != cls.__name__:
        raise UserError(
            f"model.pretrained={path}: {config} is {name}'s, not {cls.__name__}'s; {accepted}"
        )
    return folder


def read_model(cls: type, folder: Path) -> Any:
    """cls.from_pretrained(folder) from disk in float32; a folder without its weights file is a
    one-line error."""
    check_safetensors(folder, f"model.pretrained={folder}")
    with reading(f"model.pretrained={folder}", " (diffusers' folder: config.json + weights)"):
        return cls.from_pretrained(folder, **FROM_DISK)


def marked(net: Any, source: str | Path, architecture: str = OWN_CONFIG) -> Pretrained:
    """The net in training mode (from_pretrained gives eval mode) as a Pretrained, and a log line
    saying from where."""
    model = net.model if isinstance(net, ClipNet) else net
    model.train()
    log.info("model.pretrained: %s from %s (%s)", type(model).__name__, source, architecture)
    return Pretrained(net, str(source))


def check_unet_fits(net: Any, source: str, in_channels: int, context_width: int) -> None:
    """A pretrained denoiser keeps its architecture: the upstream parts must fit it."""
    for key, value, given in (
        ("in_channels", in_channels, "stage.vae's latent channels (3 without a VAE)"),
        (context_key(net), context_width, "stage.text_encoder's width"),
    ):
        if net.config[key] != value:
            raise UserError(
                f"model.pretrained={source}: its {type(net).__name__} has "
                f"{key}={net.config[key]} "
                f"but {given} is {value}: pick a VAE and a text encoder that fit it (e.g. those "
                "of its pipeline folder: stage.vae=<folder> stage.text_encoder=<folder>)"
            )
