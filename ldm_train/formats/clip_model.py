"""The CLIP folder: what stage=clip exports and what the text encoder, the chain's check and the
sample metrics read. It is open_clip's Hugging Face layout, so open_clip loads it by itself
(`open_clip.create_model_and_transforms("local-dir:<folder>")`):

- open_clip_config.json: {"model_cfg", "preprocess_cfg"} (open_clip's own save_config_for_hf);
- open_clip_model.safetensors: the weights (open_clip hub folders may hold
  open_clip_pytorch_model.bin instead: read with weights_only=True);
- <name>.json: the bare model card, for `open_clip.add_model_config(path)`.

load_named_clip reads the other way open_clip weights come: a model card bundled with open_clip
(e.g. ViT-H-14, as SD 2 uses it) and a weights file.

Reading never goes through open_clip's "local-dir:" loader: that one honours a config's
hf_tokenizer_name with the tokenizer's own code. Here the model is built from the card with
open_clip's own towers and the tokenizer is open_clip's SimpleTokenizer (its vocabulary ships in the
package), so a folder can carry weights and sizes, never code.
"""

from __future__ import annotations

import json
import logging
import pickle
from dataclasses import dataclass
from pathlib import Path

import open_clip
import safetensors.torch
import torch
from open_clip.constants import HF_CONFIG_NAME, HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME
from open_clip.model import set_model_preprocess_cfg
from open_clip.push_to_hf_hub import save_config_for_hf

from ldm_train.errors import UserError

log = logging.getLogger(__name__)

CONFIG_FILE = HF_CONFIG_NAME  # open_clip_config.json
WEIGHTS_FILES = (HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME)  # the first present is read
# Card keys that make open_clip build a tower from timm or Hugging Face code: refused.
FOREIGN_KEYS = {
    "vision_cfg": ("timm_model_name",),
    "text_cfg": ("hf_model_name", "hf_tokenizer_name"),
}


@dataclass
class ClipNet:
    """An open_clip CLIP and the model card it was built from (open_clip.CLIP's arguments): what
    stage=clip trains, and what its export writes beside the weights."""

    model: open_clip.CLIP
    card: dict


@dataclass
class LoadedClip:
    model: open_clip.CLIP
    tokenizer: open_clip.tokenizer.SimpleTokenizer
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    card: dict  # the model card it was built from (open_clip.CLIP's arguments)


def save_clip(net: open_clip.CLIP, model_cfg: dict, out_dir: Path, name: str) -> Path:
    """Write the folder: config (model card + preprocessing), bare card, safetensors weights."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config_for_hf(net, out_dir / CONFIG_FILE, model_config=model_cfg)
    (out_dir / f"{name}.json").write_text(json.dumps(model_cfg, indent=2))
    weights = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    safetensors.torch.save_file(weights, out_dir / HF_SAFE_WEIGHTS_NAME)
    return out_dir


def is_clip_folder(path: str | Path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from safetensors, or from a torch file without unpickling code: a bare state
    dict or an open_clip training checkpoint ({"state_dict": ...}, keys maybe under "module.").
    Not open_clip.load_checkpoint: its torch.load falls back to unpickling code on a TypeError."""
    if path.suffix == ".safetensors":
        return safetensors.torch.load_file(path)
    try:
        weights = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError) as error:  # e.g. OpenAI's TorchScript files
        raise UserError(
            f"{path}: not a state dict that loads without running code (weights_only): "
            f"{str(error).splitlines()[0]}"
        ) from error
    if isinstance(weights, dict) and isinstance(weights.get("state_dict"), dict):
        weights = weights["state_dict"]
    if not isinstance(weights, dict):
        raise UserError(f"{path}: holds a {type(weights).__name__}, not a state dict of weights")
    return {key.removeprefix("module."): value for key, value in weights.items()}


def load_clip(folder: str | Path, device: str | torch.device = "cpu") -> LoadedClip:
    """The CLIP of a folder in this layout (ours or an open_clip hub download), in eval mode."""
    folder = Path(folder)
    if not is_clip_folder(folder):
        raise UserError(
            f"no {CONFIG_FILE} in {folder}: point at the export folder of a clip run "
            "(e.g. outputs/<experiment>/clip/export; `python -m ldm_train.export RUN_DIR`)"
        )
    config = json.loads((folder / CONFIG_FILE).read_text())
    weights = next((folder / f for f in WEIGHTS_FILES if (folder / f).is_file()), None)
    if weights is None:
        raise UserError(f"no weights in {folder}: expected one of {', '.join(WEIGHTS_FILES)}")
    card = config.get("model_cfg") or {}
    return clip_from_card(
        card, config.get("preprocess_cfg") or {}, weights, folder / CONFIG_FILE, device
    )


def load_named_clip(
    name: str, weights: str | Path, device: str | torch.device = "cpu"
) -> LoadedClip:
    """An open_clip model card bundled with open_clip (e.g. "ViT-H-14") with a weights file on disk
    (safetensors or torch); never open_clip's pretrained download. The card must be the one the
    weights were trained with: OpenAI's weights take the -quickgelu cards."""
    card = open_clip.get_model_config(name)
    if card is None:
        raise UserError(
            f"{name!r} is not one of open_clip's model cards (open_clip.list_models(), e.g. "
            "ViT-H-14, ViT-B-32-quickgelu)"
        )
    weights = Path(weights)
    if not weights.is_file():
        raise UserError(f"no weights file at {weights} for the open_clip model {name}")
    return clip_from_card(card, card.get("preprocess_cfg") or {}, weights, name, device)


def clip_from_card(
    card: dict, preprocess: dict, weights: Path, source: object, device: str | torch.device
) -> LoadedClip:
    """Build an open_clip CLIP from its card (open_clip's own towers only) and load the weights."""
    for tower, keys in FOREIGN_KEYS.items():
        for key in keys:
            if (card.get(tower) or {}).get(key):
                raise UserError(
                    f"{source}: {tower}.{key} asks for a tower or tokenizer from "
                    "another library (code from the folder); only open_clip's own towers load"
                )
    if card.get("custom_text"):
        raise UserError(f"{source}: a CustomTextCLIP card; only plain open_clip CLIPs load")
    model = open_clip.CLIP(**card)
    state = read_weights(weights)
    check_weights_fit(model.state_dict(), state, f"{weights} ({source})")
    model.load_state_dict(state)
    mean = tuple(preprocess.get("mean", open_clip.OPENAI_DATASET_MEAN))
    std = tuple(preprocess.get("std", open_clip.OPENAI_DATASET_STD))
    set_model_preprocess_cfg(
        model, {"size": model.visual.image_size, **preprocess, "mean": mean, "std": std}
    )
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=model.context_length)
    return LoadedClip(model.to(device).eval(), tokenizer, mean, std, card)


def check_weights_fit(expected: dict, given: dict, source: str) -> None:
    """One line naming the first difference, instead of load_state_dict's page of them."""
    for key, tensor in expected.items():
        if key not in given:
            problem = f"lacks {key}"
        elif given[key].shape != tensor.shape:
            problem = f"has {key} of shape {tuple(given[key].shape)}, not {tuple(tensor.shape)}"
        else:
            continue
        raise UserError(f"{source}: the weights do not fit the model card: it {problem}")
    extra = next((key for key in given if key not in expected), None)
    if extra is not None:
        raise UserError(f"{source}: the weights do not fit the model card: {extra} is not in it")
