"""Single-file checkpoints (the one `.safetensors` or `.ckpt` most Stable Diffusion downloads are),
read through diffusers' `from_single_file`, and the noise-schedule facts a pretrained model was
trained with.

A single file holds weights only (often in the original LDM key layout, which diffusers converts);
the architecture comes from `config`: a diffusers folder of the same model (a pipeline folder, its
part's subfolder, or a model folder), or the original LDM .yaml; without one, diffusers looks for
it in the Hugging Face cache, never on the network (local_files_only). diffusers reads .ckpt files
with torch.load(weights_only=True) and .safetensors as plain tensors: no code runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import safetensors
import torch
import yaml

from ldm_train.errors import UserError, first_line

SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
SCHEDULER_CONFIG = Path("scheduler") / "scheduler_config.json"


def is_single_file(path: str | Path | None) -> bool:
    return path is not None and Path(path).is_file() and Path(path).suffix.lower() in SUFFIXES


def config_options(config: str | Path | None, part: str) -> dict[str, Any]:
    """from_single_file's architecture options for `config` (see the module docstring)."""
    if config is None:
        return {}
    config = Path(config)
    if config.suffix.lower() in (".yaml", ".yml"):
        return {"original_config": str(config)}
    if (config / part / "config.json").is_file():
        return {"config": str(config), "subfolder": part}
    return {"config": str(config)}


def check_single_file(path: Path) -> None:
    """A .safetensors file must have a readable header (an empty, truncated or lying file is one
    line, not the architecture advice below); only its header is read."""
    if path.suffix.lower() != ".safetensors":
        return
    try:
        with safetensors.safe_open(str(path), framework="pt") as weights:
            weights.keys()
    except Exception as error:  # noqa: BLE001 - safetensors' errors: the file's, one line
        first = first_line(error, 200)
        raise UserError(
            f"model.pretrained={path} is not a readable safetensors file ({first})"
        ) from None


def load_single_file(cls: type, path: str | Path, part: str, config: str | Path | None) -> Any:
    """cls (UNet2DConditionModel, AutoencoderKL) from a single file, in float32 from disk."""
    options = config_options(config, part)
    check_single_file(Path(path))
    try:
        return cls.from_single_file(
            str(path), local_files_only=True, torch_dtype=torch.float32, **options
        )
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as error:
        first = first_line(error, 200)
        given = f"model.pretrained_config={config}" if config else "no model.pretrained_config"
        raise UserError(
            f"model.pretrained={path}: diffusers cannot read it as {cls.__name__} weights with {given} "
            f"({first}); give its architecture with model.pretrained_config=FOLDER (a diffusers "
            "folder of the same model: its JSON files are enough) or =FILE.yaml (its original "
            "config)"
        ) from error


def schedule_source(pretrained: str | None, config: str | None) -> dict[str, Any]:
    """The scheduler config of model.pretrained (a pipeline folder, or a unet/ inside one) or of
    model.pretrained_config (a folder, or an original LDM .yaml); {} if neither has one."""
    for given in (pretrained, config):
        if not given:
            continue
        path = Path(given)
        if path.suffix.lower() in (".yaml", ".yml") and path.is_file():
            return ldm_schedule(yaml.safe_load(path.read_text()))
        for candidate in (path / SCHEDULER_CONFIG, path.parent / SCHEDULER_CONFIG):
            if candidate.is_file():
                return json.loads(candidate.read_text())
    return {}


def ldm_schedule(original: dict) -> dict[str, Any]:
    """The schedule facts of an original LDM config (v1-inference.yaml, v2-inference-v.yaml)."""
    params = (original or {}).get("model", {}).get("params", {})
    facts = {
        "num_train_timesteps": params.get("timesteps"),
        "beta_start": params.get("linear_start"),
        "beta_end": params.get("linear_end"),
        "prediction_type": "v_prediction" if params.get("parameterization") == "v" else "epsilon",
    }
    if params.get("linear_start") is not None:
        facts["beta_schedule"] = "scaled_linear"  # LDM's "linear" schedule is diffusers' scaled
    return {key: value for key, value in facts.items() if value is not None}
