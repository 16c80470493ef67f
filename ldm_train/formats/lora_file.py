"""LoRA adapter files: written from peft-adapted models, read back into a denoiser and its text
encoder. One module owns the format (DESIGN.md, 13):

    ADAPTER_DIR/
      pytorch_lora_weights.safetensors        diffusers' layout: what StableDiffusionPipeline.
                                               load_lora_weights reads (keys unet.* / transformer.*
                                               and text_encoder.text_model.*; the LoraConfig of each
                                               part in the file's metadata, as save_lora_weights
                                               writes it)
      pytorch_lora_weights_kohya.safetensors   optional: kohya's / webui's layout (lora_unet_*,
                                               lora_te_*, with .alpha): ComfyUI, A1111, sd-scripts
      ldm_train_lora.json                      what trained it: rank, alpha, parts, its base

Every step is diffusers' or peft's own (get_peft_model_state_dict, convert_state_dict_to_diffusers,
save_lora_weights, convert_state_dict_to_kohya, lora_state_dict, load_lora_adapter, set_adapters,
fuse_lora) except two, said where they are: the text encoder is loaded with peft directly (the
transformers route diffusers takes needs peft >= 0.22), and two kohya details are corrected.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline
from diffusers.loaders.lora_base import fuse_text_encoder_lora, set_adapters_for_text_encoder
from diffusers.utils import (
    convert_state_dict_to_diffusers,
    convert_state_dict_to_kohya,
    convert_state_dict_to_peft,
)
from diffusers.utils.peft_utils import get_peft_kwargs, recurse_remove_peft_layers
from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
from peft.utils import get_peft_model_state_dict

from ldm_train.errors import UserError, first_line

WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
KOHYA_WEIGHTS = "pytorch_lora_weights_kohya.safetensors"  # the name diffusers' examples write
INFO = "ldm_train_lora.json"
TEXT_ENCODER = "text_encoder"
TEXT_MODEL = (
    "text_model."  # CLIPTextModel's inner module: older transformers and webui keys have it
)
# Denoiser kinds -> the pipeline whose LoRA loader reads them (its key prefix: unet / transformer).
LOADERS = {
    "UNet2DConditionModel": StableDiffusionPipeline,
    "SD3Transformer2DModel": StableDiffusion3Pipeline,
}


@dataclass(frozen=True)
class LoraSpec:
    """An adapter to apply: a folder holding pytorch_lora_weights.safetensors, or a .safetensors
    file in either layout; scale multiplies its update (1: as trained)."""

    path: Path
    scale: float = 1.0


def lora_specs(paths: Sequence[str] | None, scales: Sequence[float] | None) -> list[LoraSpec]:
    """--lora PATH (repeatable) with --lora-scale S paired by order (missing scales: 1)."""
    paths, scales = list(paths or []), list(scales or [])
    if len(scales) > len(paths):
        raise UserError(f"{len(scales)} --lora-scale for {len(paths)} --lora: one scale per --lora")
    scales += [1.0] * (len(paths) - len(scales))
    return [LoraSpec(Path(path), float(scale)) for path, scale in zip(paths, scales, strict=True)]


def loader(denoiser: torch.nn.Module) -> type:
    kind = type(denoiser).__name__
    if kind not in LOADERS:
        raise UserError(f"LoRA files for a {kind} are not supported; only for {', '.join(LOADERS)}")
    return LOADERS[kind]


def prefix(denoiser: torch.nn.Module) -> str:
    """The denoiser's key prefix in diffusers' files: unet, or transformer."""
    pipeline = loader(denoiser)
    return getattr(pipeline, "unet_name", None) or pipeline.transformer_name


def peft_layers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights of a peft-adapted model in peft's naming (lora_A / lora_B)."""
    return {name: value.detach().cpu() for name, value in get_peft_model_state_dict(model).items()}


def text_layers(text_model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The text encoder's adapter weights under text_model.* (transformers 5 flattened
    CLIPTextModel; diffusers strips the prefix again for such models, kohya tools need it)."""
    layers = peft_layers(text_model)
    if hasattr(text_model, TEXT_MODEL[:-1]):
        return layers
    return {TEXT_MODEL + name: value for name, value in layers.items()}


def save_lora(
    out_dir: Path,
    denoiser: torch.nn.Module,
    text_model: torch.nn.Module | None = None,
    kohya: bool = False,
    info: dict | None = None,
) -> Path:
    """The adapter files of a denoiser (and a text encoder) that carry a peft adapter."""
    out_dir.mkdir(parents=True, exist_ok=True)
    part = prefix(denoiser)
    layers = {f"{part}_lora_layers": convert_state_dict_to_diffusers(peft_layers(denoiser))}
    metadata = {f"{part}_lora_adapter_metadata": denoiser.peft_config["default"].to_dict()}
    if text_model is not None:
        layers["text_encoder_lora_layers"] = convert_state_dict_to_diffusers(
            text_layers(text_model)
        )
        metadata["text_encoder_lora_adapter_metadata"] = text_model.peft_config["default"].to_dict()
    loader(denoiser).save_lora_weights(out_dir, **layers, **metadata, weight_name=WEIGHTS)
    if kohya:
        write_kohya(out_dir / KOHYA_WEIGHTS, denoiser, text_model)
    (out_dir / INFO).write_text(json.dumps(info or {}, indent=2))
    return out_dir


def write_kohya(path: Path, denoiser: torch.nn.Module, text_model: torch.nn.Module | None) -> None:
    """diffusers' convert_state_dict_to_kohya, with two corrections: it writes each .alpha as the
    rank (right only when lora_alpha == r), and names the text encoder lora_te1_ (SDXL's first
    encoder); SD 1.x tools (sd-scripts, A1111, ComfyUI) read a single encoder as lora_te_."""
    if prefix(denoiser) != "unet":
        raise UserError("the kohya layout is written for U-Net adapters only (adapter.kohya=false)")
    layers = {f"unet.{name}": value for name, value in peft_layers(denoiser).items()}
    alphas = {"lora_unet_": denoiser.peft_config["default"].lora_alpha}
    if text_model is not None:
        layers |= {f"{TEXT_ENCODER}.{k}": v for k, v in text_layers(text_model).items()}
        alphas["lora_te_"] = text_model.peft_config["default"].lora_alpha
    state = {}
    for key, value in convert_state_dict_to_kohya(layers).items():
        key = key.replace("lora_te1_", "lora_te_", 1)
        if key.endswith(".alpha"):
            value = torch.tensor(float(next(a for p, a in alphas.items() if key.startswith(p))))
        state[key] = value.contiguous()
    safetensors.torch.save_file(state, str(path))


def weights_file(path: Path) -> Path:
    """A .safetensors file as given, or a folder's pytorch_lora_weights.safetensors."""
    file = path / WEIGHTS if path.is_dir() else path
    if not file.is_file() or file.suffix != ".safetensors":
        raise UserError(
            f"--lora {path}: no {WEIGHTS} there; give an adapter folder (a LoRA run's export) or "
            "a .safetensors file (diffusers' or kohya's layout)"
        )
    return file


def read_lora(path: Path, denoiser: torch.nn.Module) -> tuple[dict, dict | None, dict | None]:
    """(state dict in diffusers' naming, kohya network alphas, LoraConfig metadata) of a file in
    either layout, by diffusers' lora_state_dict; safetensors only (no code runs)."""
    file = weights_file(path)
    options = {"unet_config": denoiser.config} if prefix(denoiser) == "unet" else {}
    try:
        return loader(denoiser).lora_state_dict(
            str(file.parent),
            weight_name=file.name,
            use_safetensors=True,
            local_files_only=True,
            return_lora_metadata=True,
            **options,
        )
    except (ValueError, OSError) as error:
        first = first_line(error)
        raise UserError(f"--lora {path}: not a LoRA file diffusers reads: {first[:200]}") from None


@contextlib.contextmanager
def another_adapter() -> Iterator[None]:
    """peft warns when a model gets a second adapter; several --lora ask for exactly that."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Already found a `peft_config`", UserWarning)
        yield


def load_lora(
    path: Path, name: str, denoiser: torch.nn.Module, text_model: torch.nn.Module | None
) -> None:
    """The adapter at path into the denoiser (diffusers' load_lora_adapter) and the text encoder,
    as adapter `name`. A weight that finds no place in the model is an error, not a warning."""
    state, alphas, metadata = read_lora(path, denoiser)
    part = prefix(denoiser)
    mine = [key for key in state if key.startswith(f"{part}.")]
    if mine:
        with another_adapter():
            denoiser.load_lora_adapter(
                state, prefix=part, network_alphas=alphas, metadata=metadata, adapter_name=name
            )
        placed = len(get_peft_model_state_dict(denoiser, adapter_name=name))
        if placed != len(mine):
            raise UserError(
                f"--lora {path}: only {placed} of its {len(mine)} {part} weights fit this model: "
                "it was trained for another network"
            )
    texts = without_prefix(state, TEXT_ENCODER)
    if texts:
        if text_model is None:
            raise UserError(
                f"--lora {path} adapts a text encoder, and this model has no transformers "
                "CLIPTextModel to apply it to"
            )
        load_text_lora(texts, alphas, metadata, name, text_model, path)
    if not mine and not texts:
        raise UserError(f"--lora {path}: no {part} or text_encoder weights in it")


def without_prefix(mapping: dict, part: str) -> dict:
    """The entries of `part.` (text_encoder.x -> x), the others left out."""
    return {k[len(part) + 1 :]: v for k, v in mapping.items() if k.startswith(f"{part}.")}


def load_text_lora(
    state: dict, alphas: dict | None, metadata: dict | None, name: str, model, path: Path
) -> None:
    """What diffusers' _load_lora_into_text_encoder does, with peft's inject_adapter_in_model in
    place of transformers' load_adapter (which asks for peft >= 0.22)."""
    state = convert_state_dict_to_peft(convert_state_dict_to_diffusers(state))
    if not hasattr(model, TEXT_MODEL[:-1]):
        state = {key.removeprefix(TEXT_MODEL): value for key, value in state.items()}
    config = without_prefix(metadata or {}, TEXT_ENCODER)
    if not config:
        ranks = {key: value.shape[1] for key, value in state.items() if "lora_B" in key}
        config = get_peft_kwargs(ranks, without_prefix(alphas or {}, TEXT_ENCODER), state, False)
    with another_adapter():
        inject_adapter_in_model(LoraConfig(**config), model, adapter_name=name)
    result = set_peft_model_state_dict(model, state, adapter_name=name)
    if result.unexpected_keys:
        raise UserError(
            f"--lora {path}: {len(result.unexpected_keys)} text encoder weights fit no layer of "
            f"this model (e.g. {result.unexpected_keys[0]}): it was trained for another one"
        )


def apply_loras(
    specs: Sequence[LoraSpec], denoiser: torch.nn.Module, text_model: torch.nn.Module | None
) -> list[str]:
    """Load every adapter, each at its scale, all active together; returns their names."""
    names = [f"lora{index}" for index in range(len(specs))]
    for spec, name in zip(specs, names, strict=True):
        load_lora(spec.path, name, denoiser, text_model)
    for model in (denoiser, text_model):
        held = getattr(model, "peft_config", None) or {}
        pairs = zip(names, specs, strict=True)
        active = [(name, spec.scale) for name, spec in pairs if name in held]
        if not active:
            continue
        chosen, scales = [name for name, _ in active], [scale for _, scale in active]
        if model is denoiser:
            denoiser.set_adapters(chosen, scales)  # diffusers' ModelMixin
        else:
            set_adapters_for_text_encoder(chosen, text_model, scales)
    return names


def fuse_loras(denoiser: torch.nn.Module, text_model: torch.nn.Module | None) -> None:
    """Merge the active adapters into the weights, at their scales, and remove the adapter layers
    (diffusers' fuse_lora + unload_lora; for the text encoder the same steps on its layers)."""
    if getattr(denoiser, "peft_config", None):
        denoiser.fuse_lora()
        denoiser.unload_lora()
    if text_model is not None and getattr(text_model, "peft_config", None):
        fuse_text_encoder_lora(text_model)
        recurse_remove_peft_layers(text_model)
        del text_model.peft_config
