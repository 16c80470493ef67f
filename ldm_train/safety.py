"""A file is data, never a command. What a file read from disk may name (a run folder's config.yaml,
which anyone can hand you with a checkpoint; an export's index; a URL in either) is checked here:

- Rebuilding a stage from a saved config goes through PARTS, a fixed registry of the parts a stage
  is built from, by name: the file picks a name, the registry gives the callable (the file's text
  is never imported as a module path), and every field of the node must be a parameter of that
  callable holding plain data (check_node). A file cannot extend the registry: the one escape
  hatch, Trusted, is built from the command line (`export --allow-target NAME`) and no config
  value can become one.
- No URL read from a file may run a program: webdataset opens `pipe:` URLs through a shell and
  http(s), gs, scp ... through curl or gsutil; from a file only local paths and file: URLs are
  opened (check_local_urls). The user's own command line and config may name any URL.
- Checkpoints are read with torch.load(weights_only=True) (ldm_train.checkpoints): tensors and
  plain values, never code.

Hydra instantiates whatever callable a `_target_` names (its blocklist only stops os.system and
friends): `{_target_: torch.load, f: payload.pkl, weights_only: false}` would run a pickle, and even
our own functions may do harm with a file's arguments (ldm_train.metrics.reference.read_validation
with `urls: "pipe:..."`), which is why the registry holds only what a stage is built from.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from omegaconf import DictConfig, OmegaConf

from ldm_train.errors import UserError, first_line

# Name in a config -> "module:attribute" of the part. Names are the `_target_`s conf/ writes; those
# of earlier releases stay as aliases so that older run folders still rebuild.
PARTS = {
    name: f"{name.rpartition('.')[0]}:{name.rpartition('.')[2]}"
    for name in (
        "ldm_train.stages.clip.ClipStage",
        "ldm_train.stages.clip.build_clip",
        "ldm_train.stages.vae.VaeStage",
        "ldm_train.stages.unet.UnetStage",
        "ldm_train.pretrained.clip_net",
        "ldm_train.pretrained.vae_net",
        "ldm_train.pretrained.unet_net",
        "ldm_train.perf.Perf",
        "ldm_train.optim.lr_schedule",
        "ldm_train.optim.adamw8bit",
        "ldm_train.losses.autoencoder.AutoencoderLoss",
        "ldm_train.nets.lpips.LPIPS",
        "ldm_train.nets.discriminator.NLayerDiscriminator",
        "ldm_train.diffusion.schedule.build_noise_scheduler",
        "ldm_train.diffusion.latents.LatentEncoder",
        "ldm_train.formats.vae_folder.load_vae",
        "ldm_train.diffusion.conditioning.Conditioning",
        "ldm_train.diffusion.text_encoder.load_text_encoder",
        "ldm_train.diffusion.loss.DiffusionObjective",
        "ldm_train.adapters.lora.LoraAdapter",
        "diffusers.AutoencoderKL",
        "diffusers.UNet2DConditionModel",
        "diffusers.SD3Transformer2DModel",
        "diffusers.optimization.get_constant_schedule_with_warmup",
        "diffusers.optimization.get_cosine_schedule_with_warmup",
        "open_clip.tokenizer.SimpleTokenizer",
    )
} | {
    "ldm_train.diffusion.upstream.load_vae": "ldm_train.formats.vae_folder:load_vae",
    "ldm_train.diffusion.frozen.load_vae": "ldm_train.formats.vae_folder:load_vae",
    "ldm_train.text_encoder.load_text_encoder": "ldm_train.diffusion.text_encoder:load_text_encoder",
}
HYDRA_KEYS = {"_target_", "_partial_", "_recursive_", "_convert_", "_args_"}
PLAIN = (str, int, float, bool, type(None))


@dataclass(frozen=True)
class Trusted:
    """Names the user trusts beyond PARTS (exact names, or "package." prefixes): built from the
    command line only (export --allow-target); a config value is never one."""

    names: tuple[str, ...] = ()

    def admits(self, name: str) -> bool:
        return any(name == n or (n.endswith(".") and name.startswith(n)) for n in self.names)


def torch_optimizers() -> dict[str, str]:
    """torch.optim's optimizers (conf/optimizer/<your file>.yaml may name any of them)."""
    return {
        f"torch.optim.{name}": f"torch.optim:{name}"
        for name, value in vars(torch.optim).items()
        if isinstance(value, type) and issubclass(value, torch.optim.Optimizer)
    }


@cache
def registry() -> dict[str, str]:
    return PARTS | torch_optimizers()


def locate(spec: str) -> Callable:
    module, _, attribute = spec.partition(":")
    return getattr(importlib.import_module(module), attribute)


def resolve(name: str, trusted: Trusted) -> Callable | None:
    """The callable a config's `_target_` name stands for; None if neither the registry nor the
    user's command line admits it."""
    if name in registry():
        try:
            return locate(registry()[name])
        except (ImportError, AttributeError) as error:  # a registry entry this install lacks
            raise UserError(f"{name}: not in this version ({first_line(error)})") from None
    if trusted.admits(name):
        module, _, attribute = name.rpartition(".")
        try:
            return locate(f"{module}:{attribute}")
        except (ImportError, AttributeError, ValueError) as error:
            raise UserError(
                f"--allow-target {name}: cannot import it ({first_line(error)})"
            ) from None
    return None


@cache
def program_schemes() -> frozenset[str]:
    """URL schemes webdataset opens by running a program (a shell for pipe:, curl, gsutil ...)."""
    from webdataset.gopen import gopen_schemes

    return frozenset(scheme for scheme in gopen_schemes if not scheme.startswith("_"))


def url_scheme(url: str) -> str:
    """A URL's scheme ("" for a plain path; single letters are Windows drives, not schemes)."""
    scheme = urlparse(url).scheme
    return "" if len(scheme) < 2 else scheme.lower()


def check_local_urls(urls: str | Sequence[str], key: str, source: str | Path) -> None:
    """URLs read from a file (`source`) may only name local files: a one-line UserError for any
    other (pipe: runs a shell command; http, gs, ... run curl or gsutil)."""
    for url in [urls] if isinstance(urls, str) else list(urls):
        if not isinstance(url, str):
            raise UserError(f"{source}: {key} holds {url!r}, not a path")
        scheme = url_scheme(url)
        if scheme not in ("", "file"):
            raise UserError(
                f"{source}: {key}={url!r} is a {scheme}: URL, and a URL read from a file may only "
                f"name local files ({scheme}: would run a program); give it yourself on the "
                "command line if you trust it"
            )


def check_value(value: Any, where: str, source: str | Path) -> None:
    """A field's value: plain data, no string a URL reader would run a program for."""
    if isinstance(value, str) and url_scheme(value) in program_schemes():
        raise UserError(
            f"{source}: {where}={value!r} is a {url_scheme(value)}: URL, which would run a "
            "program; a file may not name one"
        )
    if not isinstance(value, PLAIN):
        raise UserError(f"{source}: {where} holds a {type(value).__name__}, not plain data")


def parameters(target: Callable) -> set[str] | None:
    """The keyword names target takes; None when it takes any (**kwargs)."""
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values()):
        return None
    return {p.name for p in signature.parameters.values() if p.name != "self"}


def check_node(node: Any, where: str, source: str | Path, trusted: Trusted) -> Any:
    """node (plain containers) with every `_target_` replaced by the registered callable, after
    checking each field; a one-line UserError naming the first that is not allowed."""
    if isinstance(node, list):
        return [check_node(v, f"{where}[{i}]", source, trusted) for i, v in enumerate(node)]
    if not isinstance(node, dict):
        check_value(node, where, source)
        return node
    target = check_target(node, where, source, trusted) if "_target_" in node else None
    checked = {
        key: check_node(value, f"{where}.{key}", source, trusted)
        for key, value in node.items()
        if key != "_target_"
    }
    return checked if target is None else {**checked, "_target_": target}


def check_target(node: dict, where: str, source: str | Path, trusted: Trusted) -> Callable:
    """The callable a node's `_target_` names, if the registry (or the user) admits it and the
    node's fields are its parameters."""
    name = node["_target_"]
    target = resolve(name, trusted) if isinstance(name, str) else None
    if target is None:
        raise UserError(
            f"{source}: {where} asks to run {name!r}, which is not one of the parts a stage is "
            "built from; refusing to load it (if you trust that file, allow the name on the "
            "command line: --allow-target NAME)"
        )
    accepted = parameters(target)
    unknown = [
        k for k in node if k not in HYDRA_KEYS and accepted is not None and k not in accepted
    ]
    if unknown:
        raise UserError(f"{source}: {where}.{unknown[0]} is not a parameter of {name}")
    return target


def rebuild(
    node: DictConfig, source: str | Path, where: str, trusted: Trusted | None = None
) -> Any:
    """Build what a saved config's node describes, through the registry (check_node)."""
    from hydra.utils import instantiate

    if not isinstance(trusted, Trusted | None):
        raise TypeError("trusted must be a Trusted built from the command line")
    plain = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node
    checked = check_node(plain, where, source, trusted or Trusted())
    try:
        return instantiate(checked)
    except Exception as error:  # noqa: BLE001 - the file's values: said in one line
        cause = error
        while cause.__cause__ is not None:  # Hydra's InstantiationException wraps the reason
            cause = cause.__cause__
        if isinstance(cause, UserError):
            raise cause from None
        raise UserError(f"{source}: cannot build {where}: {first_line(cause)}") from None


def check_safetensors(folder: Path, what: str) -> None:
    """Weights are read from safetensors only (no pickle is opened, however safely): a model
    folder without them is a one-line UserError instead of a library's fallback to a .bin (and
    its warnings)."""
    if not any(Path(folder).glob("*.safetensors")) and not any(
        Path(folder).glob("*.safetensors.index.json")
    ):
        found = sorted(p.name for p in Path(folder).glob("*.bin"))
        also = f" (it holds {', '.join(found)}: pickles, not loaded)" if found else ""
        raise UserError(f"{what}: no safetensors weights in {folder}{also}")
