"""LoRA for the U-Net stage (config group adapter=lora): low-rank matrices beside the denoiser's
attention projections (and optionally the text encoder's) train; the base weights are frozen, come
from model.pretrained (and stage.text_encoder), and never enter a checkpoint or the export.

    adapter = LoraAdapter(rank=8, alpha=8)
    text_model = adapter.attach(net, base, conditioning)  # peft layers in place; the base frozen
    adapter.param_groups(net, text_model)                 # what the optimizer gets
    adapter.save(out_dir, net, text_model, base)          # formats/lora_file.py's folder

The denoiser takes the adapter through diffusers' own support (ModelMixin.add_adapter with a peft
LoraConfig): any diffusers model that has it works, with named sets of target modules per network
kind (TARGET_SETS: attention, the default, or cross_kv) or adapter.target_modules as a list. The
text encoder must be a transformers CLIPTextModel (an export's or SD 1.x's text_encoder/); peft
injects into it directly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, inject_adapter_in_model

from ldm_train.diffusion.conditioning import Conditioning
from ldm_train.diffusion.text_encoder import TransformersTextEncoder
from ldm_train.errors import UserError
from ldm_train.formats.lora_file import save_lora
from ldm_train.rules import Choice, Either, Int, Real, Rule, Texts

# Named sets of target modules per network kind (adapter.target_modules=<name>; null: attention).
# attention: the projections diffusers' LoRA examples adapt, train_dreambooth_lora.py (U-Net) and
#   train_dreambooth_lora_sd3.py (the MMDiT, whose joint attention also projects the text stream);
# cross_kv: only where the text enters, the keys and values made from its hidden states (Custom
#   Diffusion, Kumari et al. 2023): a new word learns what to draw while prompts without it change
#   least (README "Adapt a model with LoRA" measures both).
TARGET_SETS: dict[str, dict[str, tuple[str, ...]]] = {
    "attention": {
        "UNet2DConditionModel": ("to_q", "to_k", "to_v", "to_out.0"),
        "SD3Transformer2DModel": (
            *("to_q", "to_k", "to_v", "to_out.0"),
            *("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"),
        ),
    },
    "cross_kv": {
        "UNet2DConditionModel": ("attn2.to_k", "attn2.to_v"),
        "SD3Transformer2DModel": ("add_k_proj", "add_v_proj"),
    },
}
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")  # CLIPTextModel's attention
# adapter.<key>'s values (the config's schema checks them before a run; the dataclass again when
# code builds one)
ADAPTER_RULES: dict[str, Rule] = {
    "rank": Int(1),
    "alpha": Real(0, low_open=True),  # the update is scaled by alpha / rank
    "dropout": Real(0, 1, high_open=True),
    "text_encoder_lr": Real(0, low_open=True, null=True),  # null: the optimizer's
    "target_modules": Either((Choice(tuple(TARGET_SETS)), Texts(single=False)), null=True),
}


@dataclass
class LoraAdapter:
    """The options of adapter=lora (conf/adapter/lora.yaml). scale = alpha / rank."""

    rank: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    target_modules: Sequence[str] | str | None = None  # a TARGET_SETS name; None: attention
    text_encoder: bool = False
    text_encoder_modules: Sequence[str] | None = None  # None: TEXT_TARGETS
    text_encoder_lr: float | None = None  # None: the optimizer's (model.lr)
    kohya: bool = False  # also write the kohya layout beside diffusers'

    def __post_init__(self) -> None:
        for name, rule in ADAPTER_RULES.items():
            rule.check(f"adapter.{name}", getattr(self, name))

    def config(self, targets: Sequence[str]) -> LoraConfig:
        # "gaussian": A ~ N(0, 1/r), B = 0 (diffusers' examples): it starts as the base model.
        return LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            init_lora_weights="gaussian",
            target_modules=list(targets),
        )

    def denoiser_targets(self, net: torch.nn.Module) -> list[str]:
        """adapter.target_modules: module names as given, or a TARGET_SETS name for the net's kind
        (None: attention)."""
        targets = self.target_modules or "attention"  # a name or a list: ADAPTER_RULES
        if not isinstance(targets, str):
            return list(targets)
        kind = type(net).__name__
        if kind not in TARGET_SETS[targets]:
            raise UserError(
                f"adapter=lora has no {targets} target modules for a {kind}: set "
                "adapter.target_modules (names of its Linear/Conv layers, e.g. [to_q,to_k,to_v])"
            )
        return list(TARGET_SETS[targets][kind])

    def attach(
        self, net: torch.nn.Module, base: str | None, conditioning: Conditioning
    ) -> torch.nn.Module | None:
        """Adapters into the net (and the text encoder), the base weights frozen; returns the text
        encoder's model when it trains too (for the stage to hold), else None. base: where the
        net's weights came from (model.pretrained); None: a new net, which LoRA cannot adapt."""
        if base is None:
            raise UserError(
                "adapter=lora adapts existing weights: set model.pretrained to an export or a "
                "Stable Diffusion pipeline folder (README: Adapt a model with LoRA)"
            )
        if not hasattr(net, "add_adapter"):
            raise UserError(f"adapter=lora: a {type(net).__name__} has no add_adapter (diffusers)")
        net.requires_grad_(False)
        net.add_adapter(self.config(self.denoiser_targets(net)))
        if not self.text_encoder:
            return None
        model = self.text_model(conditioning)
        model.requires_grad_(False)
        inject_adapter_in_model(self.config(self.text_encoder_modules or TEXT_TARGETS), model)
        return model.train()  # as the net: the stage's train/eval switches reach it from now on

    def text_model(self, conditioning: Conditioning) -> torch.nn.Module:
        encoder = conditioning.text_encoder(torch.device("cpu"))
        if not isinstance(encoder, TransformersTextEncoder):
            found = "none" if encoder is None else f"an open_clip tower ({type(encoder).__name__})"
            raise UserError(
                f"adapter.text_encoder=true needs a transformers CLIPTextModel, and "
                f"stage.text_encoder is {found}: point it at an export or an SD 1.x folder "
                "(their text_encoder/), or set adapter.text_encoder=false"
            )
        if encoder.layer != "last":
            raise UserError(
                "adapter.text_encoder=true with stage.text_layer=penultimate: an export holds the "
                "text encoder up to the layer it uses; adapt that one (stage.text_layer=last)"
            )
        if conditioning.cache.size > 0:
            raise UserError(
                "adapter.text_encoder=true: the text encoder trains, so its hidden states "
                "cannot be kept; set stage.module.conditioning.cache_size=0"
            )
        return encoder.model

    def param_groups(self, net: torch.nn.Module, text_model: torch.nn.Module | None) -> list:
        """The adapter weights for the optimizer; the text encoder's at text_encoder_lr."""
        groups = [{"params": [p for p in net.parameters() if p.requires_grad]}]
        if text_model is not None:
            group = {"params": [p for p in text_model.parameters() if p.requires_grad]}
            if self.text_encoder_lr is not None:
                group["lr"] = self.text_encoder_lr
            groups.append(group)
        return groups

    def save(
        self,
        out_dir: Path,
        net: torch.nn.Module,
        text_model: torch.nn.Module | None,
        base: str | None = None,
    ) -> Path:
        """The adapter folder (ldm_train.formats.lora_file), with what trained it (base: the
        model.pretrained it adapts)."""
        info = {
            "base": base,
            "denoiser": type(net).__name__,
            "rank": self.rank,
            "alpha": self.alpha,
            "target_modules": self.denoiser_targets(net),
            "text_encoder": text_model is not None,
        }
        return save_lora(Path(out_dir), net, text_model, self.kohya, info)


def seed_dropout(adapter: LoraAdapter | None, generator: torch.Generator) -> None:
    """LoRA dropout draws from torch's global generator: seeded here from the step's generator,
    so that a resumed run repeats an uninterrupted one (DESIGN.md, 14). Nothing without dropout."""
    if adapter is not None and adapter.dropout > 0:
        draw = torch.randint(1 << 62, (1,), generator=generator, device=generator.device)
        torch.manual_seed(int(draw))


def adapter_names(module: torch.nn.Module) -> set[str]:
    """The state-dict names of what trains: the adapter weights (everything else is frozen)."""
    return {name for name, parameter in module.named_parameters() if parameter.requires_grad}


def adapter_only(state: dict, names: set[str]) -> dict:
    """A checkpoint's state dict without the base weights (they come from model.pretrained)."""
    return {key: value for key, value in state.items() if key in names}


def check_adapter_state(state: dict, names: set[str], known: set[str]) -> None:
    """A state dict to load into an adapted stage holds every adapter weight and nothing the stage
    does not have (a whole state dict, e.g. gathered from FSDP shards, is fine)."""
    missing = sorted(names - set(state))
    unknown = sorted(set(state) - known)
    if missing or unknown:
        name = (missing or unknown)[0]
        what = "lacks" if missing else "holds"
        raise UserError(
            f"the checkpoint {what} {name} ({len(missing)} adapter weights missing, "
            f"{len(unknown)} unknown): resume with the adapter settings it was trained with"
        )


def trained_context(
    conditioning: Conditioning, batch: dict, dropped: list[bool], device: torch.device
) -> torch.Tensor:
    """The context of a training batch through the adapted text encoder, with its graph (the
    frozen route, Conditioning.batch_context, runs without one and may read cached states)."""
    if "text" in batch:
        raise UserError(
            "adapter.text_encoder=true trains the text encoder: train from image shards, not from "
            "cached hidden states (python -m ldm_train.cache_latents)"
        )
    captions = [
        "" if drop else caption for caption, drop in zip(batch["caption"], dropped, strict=True)
    ]
    return conditioning.text_encoder(device).encode(captions)[0]
