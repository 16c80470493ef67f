"""The speed switches (ldm_train/perf.py: perf.*, optimizer.* and trainer.* keys): each trains a step
through the real train() on the CPU with tiny nets, and does what it says."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

from ldm_train.diffusion.latents import vae_moments
from ldm_train.train import train

pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log", "ignore::UserWarning")

# One step, no validation and no export-time sampling: the tests check the switch, not the run.
ONE_STEP = ["trainer.max_steps=1", "trainer.limit_val_batches=0", "logger=none"]
CLIP_SMALL = ["model.net.text_cfg.layers=1", "model.net.embed_dim=32"]


def optimizer(objects) -> torch.optim.Optimizer:
    return objects["trainer"].optimizers[0]


def unet_net(objects):
    return objects["module"].net


def processors(objects) -> set[type]:
    return {type(p) for p in unet_net(objects).attn_processors.values()}


def is_channels_last(weight: torch.Tensor) -> bool:
    return weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()


Check = Callable[[dict, dict], bool]
# id: (stage, overrides, check(objects, counts)); counts["sdpa"]: calls of torch's SDPA in the run.
SWITCHES: dict[str, tuple[str, list[str], Check]] = {
    "unet-bf16-mixed": (
        "unet",
        ["trainer.precision=bf16-mixed"],
        lambda o, c: (
            o["trainer"].precision == "bf16-mixed"
            and unet_net(o).dtype == torch.float32  # mixed: fp32 weights, bf16 compute
            and o["module"].latents.vae(o["module"].device).dtype == torch.float32
        ),
    ),
    "unet-channels-last": (
        "unet",
        ["perf.channels_last=true"],
        lambda o, c: is_channels_last(unet_net(o).conv_in.weight),
    ),
    "unet-gradient-checkpointing": (
        "unet",
        ["perf.gradient_checkpointing=true"],
        lambda o, c: unet_net(o).is_gradient_checkpointing,
    ),
    "unet-fused-adamw": (  # the default
        "unet",
        [],
        lambda o, c: optimizer(o).defaults["fused"] is True,
    ),
    "unet-foreach-adamw": (
        "unet",
        ["optimizer.fused=false", "+optimizer.foreach=true"],
        lambda o, c: optimizer(o).defaults["foreach"] is True,
    ),
    "unet-sdpa-attention": (  # the default: diffusers' AttnProcessor2_0 calls torch's SDPA
        "unet",
        [],
        lambda o, c: (
            processors(o) == {AttnProcessor2_0}
            and c["sdpa"] > 0
            # and the FLOPs Lightning's ThroughputMonitor turns into FLOP/s and MFU: the tiny U-Net's
            # forward + backward, 0.6 GFLOP per 32 px image
            and 0.5e9 < o["module"].flops_per_batch / 8 < 0.7e9
        ),
    ),
    "unet-eager-attention": (
        "unet",
        ["perf.attention=eager"],
        lambda o, c: processors(o) == {AttnProcessor} and c["sdpa"] == 0,
    ),
    "unet-accumulate-2": (  # one optimizer step from two batches
        "unet",
        ["trainer.accumulate_grad_batches=2"],
        lambda o, c: (
            o["trainer"].global_step == 1
            and o["trainer"].fit_loop.epoch_loop.batch_progress.total.completed == 2
        ),
    ),
    "clip-bf16-mixed": (
        "clip",
        [*CLIP_SMALL, "trainer.precision=bf16-mixed"],
        lambda o, c: o["trainer"].precision == "bf16-mixed",
    ),
    "clip-channels-last": (
        "clip",
        [*CLIP_SMALL, "perf.channels_last=true"],
        lambda o, c: is_channels_last(o["module"].net.visual.conv1.weight),
    ),
    "clip-gradient-checkpointing": (
        "clip",
        [*CLIP_SMALL, "perf.gradient_checkpointing=true"],
        lambda o, c: o["module"].net.transformer.grad_checkpointing,
    ),
    "clip-foreach-adamw": (
        "clip",
        [*CLIP_SMALL, "optimizer.fused=false", "+optimizer.foreach=true"],
        lambda o, c: optimizer(o).defaults["foreach"] is True,
    ),
    "vae-bf16-mixed": ("vae", ["trainer.precision=bf16-mixed"], lambda o, c: True),
    "vae-channels-last": (
        "vae",
        ["perf.channels_last=true"],
        lambda o, c: is_channels_last(o["module"].net.encoder.conv_in.weight),
    ),
    "vae-gradient-checkpointing": (
        "vae",
        ["perf.gradient_checkpointing=true"],
        lambda o, c: o["module"].net.is_gradient_checkpointing,
    ),
    "vae-eager-attention": (
        "vae",
        ["perf.attention=eager"],
        lambda o, c: {type(p) for p in o["module"].net.attn_processors.values()} == {AttnProcessor},
    ),
}


@pytest.fixture
def stage_cfg(make_cfg, unet_overrides):
    def compose(stage: str, *overrides: str):
        unet = unet_overrides if stage == "unet" else []
        return make_cfg(f"stage={stage}", *unet, *ONE_STEP, *overrides)

    return compose


@pytest.fixture
def sdpa_calls(monkeypatch) -> dict[str, int]:
    """Counts calls of torch.nn.functional.scaled_dot_product_attention (looked up at call time)
    made inside the U-Net's forward on real tensors (the text encoder calls it too)."""
    counts = {"sdpa": 0, "depth": 0}
    sdpa, forward = torch.nn.functional.scaled_dot_product_attention, UNet2DConditionModel.forward

    def counted(*args, **kwargs):
        counts["sdpa"] += counts["depth"] > 0 and not args[0].is_meta  # meta: the FLOP count
        return sdpa(*args, **kwargs)

    def unet_forward(self, *args, **kwargs):
        counts["depth"] += 1
        try:
            return forward(self, *args, **kwargs)
        finally:
            counts["depth"] -= 1

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counted)
    monkeypatch.setattr(UNet2DConditionModel, "forward", unet_forward)
    return counts


@pytest.mark.parametrize("switch", SWITCHES)
def test_switch_trains_a_step(switch, stage_cfg, sdpa_calls):
    stage, overrides, check = SWITCHES[switch]
    metrics, objects = train(stage_cfg(stage, *overrides))
    assert objects["trainer"].global_step == 1
    losses = [v for k, v in metrics.items() if k.startswith("train/") and "step" not in k]
    assert losses and all(torch.isfinite(torch.tensor(v)) for v in losses), metrics
    assert check(objects, sdpa_calls), switch


# The tiny U-Net with one level (a cross-attention block down, the middle block, one up): inductor
# compiles 61 C++ kernels for its forward and backward instead of the preset's 90.
ONE_LEVEL = [
    "model.net.block_out_channels=[32]",
    "model.net.down_block_types=[CrossAttnDownBlock2D]",
    "model.net.up_block_types=[CrossAttnUpBlock2D]",
]


@pytest.mark.parametrize(
    "backend",
    # inductor: compiling even a tiny U-Net's forward and backward takes minutes on 2 CPU cores
    ["eager", pytest.param("inductor", marks=pytest.mark.slow)],
)
def test_compiled_unet_trains_a_step(backend, stage_cfg, monkeypatch):
    # Scalar C++ kernels (no SIMD): a fifth less CPU to compile on 2 cores; the graph, its lowering
    # and the training step are the same as with vectorised ones.
    monkeypatch.setattr(torch._inductor.config.cpp, "simdlen", 0)
    compiled = ["perf.compile=true", f"perf.compile_backend={backend}"]
    metrics, objects = train(stage_cfg("unet", *ONE_LEVEL, *compiled))
    net = objects["module"].net
    assert net._compiled_call_impl is not None  # nn.Module.compile, in place
    assert all(not k.startswith("_orig_mod") for k in net.state_dict())  # checkpoints unchanged
    assert torch.isfinite(torch.tensor(metrics["train/mse"]))


def test_the_vae_stays_fp32_under_autocast(upstream):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(upstream["vae"]).eval()
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        expected = vae_moments(vae, images)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            moments = vae_moments(vae, images)
    assert moments.dtype == torch.float32 and torch.equal(moments, expected)
