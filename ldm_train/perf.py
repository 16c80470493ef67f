"""Speed switches: the `perf:` block of the config, one Perf that every stage applies to its
trainable net (StageModule.__init__) and to that net's inputs.

Each is a library's own mechanism, applied in place so parameter names, checkpoints, the EMA copy
and exports stay as without it:
- channels_last: torch's NHWC memory format for the weights (inputs follow, Perf.input); faster
  convolutions on tensor cores and oneDNN.
- compile: nn.Module.compile (torch.compile of the module's forward, in place; `torch.compile(net)`
  would wrap it and prefix every state_dict key with `_orig_mod.`); compile_backend: torch.compile's
  backend (inductor generates kernels; eager only captures graphs, to debug the wiring quickly).
- gradient_checkpointing: diffusers' enable_gradient_checkpointing / open_clip's
  set_grad_checkpointing: recompute activations in the backward pass, less memory, ~30% more time.
- attention (diffusers nets: vae, unet): "sdpa" is diffusers' default AttnProcessor2_0
  (torch.nn.functional.scaled_dot_product_attention: flash / memory-efficient kernels on GPUs);
  "eager" is the classic AttnProcessor (explicit softmax(QK^T)V), for comparison and debugging.
Precision (trainer.precision), the optimizer's fused / foreach kernels (optimizer=...) and gradient
accumulation (trainer.accumulate_grad_batches) are Lightning's and torch's options as they are; the
frozen VAE runs in fp32 under mixed precision (ldm_train.diffusion.frozen).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch

from ldm_train.errors import UserError, check_choice

Attention = Literal["sdpa", "eager"]
ATTENTION_KINDS: tuple[str, ...] = get_args(Attention)


def set_attention(net: torch.nn.Module, kind: Attention) -> None:
    """Every attention layer of a diffusers net to the given processor. A net with processors of
    its own kind (SD3Transformer2DModel's joint attention: JointAttnProcessor2_0, which is sdpa)
    keeps them; it has no eager twin."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    own = {type(p).__name__ for p in net.attn_processors.values()}
    if own - {AttnProcessor.__name__, AttnProcessor2_0.__name__}:
        if kind != "sdpa":
            raise UserError(
                f"perf.attention={kind}: {type(net).__name__}'s attention ({', '.join(sorted(own))}) "
                "runs on torch's scaled_dot_product_attention only; use perf.attention=sdpa"
            )
        return
    net.set_attn_processor(AttnProcessor2_0() if kind == "sdpa" else AttnProcessor())


@dataclass(frozen=True)
class Perf:
    """The speed switches (config `perf:`), checked when built."""

    channels_last: bool = False
    compile: bool = False
    compile_backend: str = "inductor"
    gradient_checkpointing: bool = False
    attention: Attention = "sdpa"

    def __post_init__(self) -> None:
        check_choice("perf.attention", self.attention, ATTENTION_KINDS)

    def apply(self, net: torch.nn.Module) -> torch.nn.Module:
        """The switches on `net`, in place; returns net."""
        if hasattr(net, "set_attn_processor"):  # a diffusers net
            set_attention(net, self.attention)
        elif self.attention != "sdpa":
            raise UserError(
                f"perf.attention={self.attention} switches diffusers' attention (stage=vae, "
                f"stage=unet); {type(net).__name__} has no such switch: drop it for this stage"
            )
        if self.gradient_checkpointing:
            if hasattr(net, "enable_gradient_checkpointing"):  # diffusers ModelMixin
                net.enable_gradient_checkpointing()
            else:  # open_clip CLIP
                net.set_grad_checkpointing(True)
        if self.channels_last:
            net.to(memory_format=torch.channels_last)
        if self.compile:
            net.compile(backend=self.compile_backend)
        return net

    def input(self, x: torch.Tensor) -> torch.Tensor:
        """A 4-d input in NHWC memory order when channels_last is on (else unchanged)."""
        return to_channels_last(x, self.channels_last)


def to_channels_last(x: torch.Tensor, on: bool) -> torch.Tensor:
    """A 4-d input in NHWC memory order when channels_last is on (else unchanged)."""
    return x.contiguous(memory_format=torch.channels_last) if on and x.dim() == 4 else x
