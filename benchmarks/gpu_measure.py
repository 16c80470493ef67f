"""The measurements of `make gpu-check` (benchmarks/gpu.py). Each stage is built from the real
config (compose_config + the stage's module, its callbacks, the optimizer group, perf switches) and
trained by Lightning's Trainer, as `python -m ldm_train` would, on synthetic batches held in memory:
random weights, no downloads, no loader in the way (the loader has its own benchmark). Rates are
timed from the start of the first step after the warm-up to the end of the last, both points
synchronised with the device; memory is CUDA's peak allocation over the run (weights, gradients,
optimizer and EMA states, activations)."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig

from ldm_train.config import compose_config
from ldm_train.train import build, build_callbacks

MOSAIC_PER_A100 = (
    137.0  # MosaicML: SD 2's U-Net at 256 px from cached latents, ~1,100 img/s on 8 A100s
)
# Dense bf16 tensor-core peaks (NVIDIA datasheets; "with sparsity" figures are twice these), by a
# piece of torch.cuda.get_device_name(), first match wins. Not Lightning's get_available_flops: its
# H200 entries are the sparse figures, and it finds no entry for the name "NVIDIA H200".
PEAK_BF16 = (
    ("h200 nvl", 835e12),
    ("h100 nvl", 835e12),
    ("h100 pcie", 756e12),
    ("h200", 989.4e12),
    ("gh200", 989.4e12),
    ("h100", 989.4e12),
    ("h800", 989.4e12),
    ("a100", 312e12),
)
VIT_L14_TEXT = dict(  # CLIP ViT-L/14's text tower (SD 1.x's text encoder): 123M parameters
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12
)
TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)


@dataclass(frozen=True)
class Preset:
    """Sizes of one gpu-check: the real one (GPU) or the dry one (CPU, tiny, a few steps)."""

    accelerator: str
    unet: str  # model presets (conf/model/<stage>/)
    vae: str
    clip: str
    image_size: int  # unet and vae
    clip_image_size: int
    text: dict = field(default_factory=dict)  # the text tower's CLIPTextConfig sizes
    unet_batch: int = 64
    vae_batch: int = 16
    clip_batch: int = 256
    steps: int = 20  # timed steps
    warmup: int = 5
    compile_warmup: int = 3  # the first compiled steps compile
    compile_backend: str = "inductor"


GPU = Preset("gpu", "sd15", "sd", "ViT-B-32", 256, 224, VIT_L14_TEXT)
DRY = Preset(
    "cpu", "tiny", "tiny", "tiny", 32, 32, TINY_TEXT, 4, 2, 8, 2, 1, 1, compile_backend="eager"
)


def peak_flops(device_name: str) -> tuple[str, float] | None:
    """(matched name, dense bf16 FLOP/s) of a GPU, or None when not in PEAK_BF16."""
    name = device_name.lower()
    return next(((key, peak) for key, peak in PEAK_BF16 if key in name), None)


def write_parts(root: Path, preset: Preset) -> dict[str, Path]:
    """A random VAE (the preset's) and text tower (a transformers CLIPTextModel with open_clip's
    vocabulary, SD 1.x's layout): what stage=unet loads (their weights do not change the speed)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from ldm_train.formats.transformers_clip import clip_tokenizer, save_text_encoder

    parts = {"vae": root / "vae", "text": root / "text"}
    if not (parts["vae"] / "config.json").is_file():
        vae_cfg = compose_config(
            ["stage=vae", f"model=vae/{preset.vae}", f"data.image_size={preset.image_size}"]
        )
        instantiate(vae_cfg.model.net, scaling_factor=1.0).save_pretrained(parts["vae"])
    if not (parts["text"] / "tokenizer").is_dir():
        config = CLIPTextConfig(max_position_embeddings=77, hidden_act="quick_gelu", **preset.text)
        save_text_encoder(CLIPTextModel(config), clip_tokenizer(77), parts["text"])
    return parts


class Timer(L.Callback):
    """Seconds from the start of step `warmup` to the end of the last step (both synchronised with
    the GPU), and the peak GPU memory of the run."""

    def __init__(self, warmup: int):
        self.warmup, self.start, self.seconds, self.peak = warmup, None, None, None

    def sync(self, trainer: L.Trainer) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()

    def on_train_start(self, trainer, pl_module) -> None:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.warmup and self.start is None:
            self.sync(trainer)
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= trainer.max_steps and self.start is not None:
            self.sync(trainer)
            self.seconds = time.perf_counter() - self.start
            if trainer.strategy.root_device.type == "cuda":
                self.peak = torch.cuda.max_memory_allocated() / 2**30


class Repeated(torch.utils.data.IterableDataset):
    """The same ready-made batch, `count` times (a DataLoader with batch_size=None)."""

    def __init__(self, batch: dict, count: int):
        self.batch, self.count = batch, count

    def __iter__(self):
        return itertools.repeat(self.batch, self.count)


def fit(cfg: DictConfig, module: L.LightningModule, batch: dict, steps: int, warmup: int) -> Timer:
    """trainer.fit of the module on `batch`, with the config's callbacks but no checkpoints."""
    timer = Timer(warmup)
    callbacks = [c for c in build_callbacks(cfg, None) if not isinstance(c, ModelCheckpoint)]
    trainer = instantiate(
        cfg.trainer,
        devices=1,
        max_steps=warmup + steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[*callbacks, timer],
        default_root_dir=str(cfg.paths.run_dir),
    )
    loader = torch.utils.data.DataLoader(Repeated(batch, warmup + steps), batch_size=None)
    trainer.fit(module, train_dataloaders=loader)
    if timer.seconds is None:
        raise RuntimeError(f"the run stopped before its last step ({trainer.global_step} steps)")
    return timer


def synthetic_batch(size: int, cuda: bool, **tensors: tuple[tuple[int, ...], torch.dtype]) -> dict:
    """What our loader yields (captions, keys, meta) with random tensors of these shapes; pinned
    on a GPU machine, as a loader with pin_memory gives them."""
    batch: dict[str, Any] = {
        "caption": [f"a photo of thing {i}" for i in range(size)],
        "key": [f"{i:08d}" for i in range(size)],
        "meta": [{} for _ in range(size)],
        "skipped": 0,
    }
    for name, (shape, dtype) in tensors.items():
        tensor = torch.randn(size, *shape).clamp(-1, 1).to(dtype)
        batch[name] = tensor.pin_memory() if cuda else tensor
    return batch


@dataclass
class Measure:
    """What the rows of one gpu-check share: its sizes, the work folder and the parts."""

    preset: Preset
    work: Path
    parts: dict[str, Path] = field(default_factory=dict)
    unet_net: torch.nn.Module | None = None  # built once, reused by the U-Net rows

    @property
    def cuda(self) -> bool:
        return self.preset.accelerator == "gpu"

    def config(self, stage: str, model: str, image_size: int, *overrides: str) -> DictConfig:
        return compose_config(
            [
                f"stage={stage}",
                f"model={stage}/{model}",
                f"data.image_size={image_size}",
                f"paths.output_root={self.work / 'outputs'}",
                "data.make_dataset=null",
                "logger=none",
                "trainer.enable_progress_bar=false",  # (fit passes it too: no bar callback then)
                f"trainer.accelerator={self.preset.accelerator}",
                "trainer.precision=bf16-mixed",
                *overrides,
            ]
        )

    def unet(self, *overrides: str, images: bool = False, warmup: int | None = None) -> dict:
        """A U-Net row: from cached latents (moments + text hidden states, float16 as
        `cache_latents --dtype float16` writes them), or from images and captions (the VAE and
        the text tower run at every step)."""
        p = self.preset
        if not self.parts:
            self.parts = write_parts(self.work / "parts", p)
        parts = [f"stage.vae={self.parts['vae']}", f"stage.text_encoder={self.parts['text']}"]
        cfg = self.config("unet", p.unet, p.image_size, *parts, *overrides)
        module = build(cfg.stage.module, **({"net": self.unet_net} if self.unet_net else {}))
        self.unet_net = module.net
        channels, side = module.latents.channels, module.latents.side
        width = module.net.config.cross_attention_dim
        if images:
            shapes = {"image": ((3, p.image_size, p.image_size), torch.float32)}
        else:
            shapes = {
                "latent": ((2 * channels, side, side), torch.float16),
                "text": ((77, width), torch.float16),
            }
        batch = synthetic_batch(p.unet_batch, self.cuda, **shapes)
        timer = fit(cfg, module, batch, p.steps, p.warmup if warmup is None else warmup)
        return self.rates(timer, p.unet_batch, module.flops_per_batch)

    def vae(self) -> dict:
        p = self.preset
        cfg = self.config("vae", p.vae, p.image_size)
        batch = synthetic_batch(
            p.vae_batch, self.cuda, image=((3, p.image_size, p.image_size), torch.float32)
        )
        return self.rates(fit(cfg, build(cfg.stage.module), batch, p.steps, p.warmup), p.vae_batch)

    def clip(self) -> dict:
        p = self.preset
        cfg = self.config("clip", p.clip, p.clip_image_size)
        size = p.clip_image_size
        batch = synthetic_batch(p.clip_batch, self.cuda, image=((3, size, size), torch.float32))
        return self.rates(fit(cfg, build(cfg.stage.module), batch, p.steps, p.warmup), p.clip_batch)

    def rates(self, timer: Timer, batch_size: int, flops: int | None = None) -> dict:
        """images/s, and for the U-Net its model FLOP utilisation and ratio to MosaicML's figure."""
        steps_per_s = self.preset.steps / timer.seconds
        row = {"images_per_s": steps_per_s * batch_size, "peak_gib": timer.peak}
        if flops:
            row["tflops"] = flops * steps_per_s / 1e12
            row["vs_mosaic"] = row["images_per_s"] / MOSAIC_PER_A100
            peak = peak_flops(torch.cuda.get_device_name()) if self.cuda else None
            if peak is not None:
                row["mfu"] = flops * steps_per_s / peak[1]
                row["peak"] = f"{peak[0]}: {peak[1] / 1e12:.0f} TFLOP/s bf16 dense"
        return row


# The rows of the table, in its order: each U-Net row adds one switch to the one above it.
ROWS: dict[str, tuple[str, Any]] = {
    "unet-foreach": (
        "U-Net {unet} {px} px, cached latents, bf16, foreach AdamW",
        lambda m: m.unet("optimizer.fused=false", "+optimizer.foreach=true"),
    ),
    "unet-fused": ("  + fused AdamW", lambda m: m.unet()),
    "unet-channels-last": ("  + channels_last", lambda m: m.unet("perf.channels_last=true")),
    "unet-compile": (
        "  + torch.compile ({backend})",
        lambda m: m.unet(
            "perf.channels_last=true",
            "perf.compile=true",
            f"perf.compile_backend={m.preset.compile_backend}",
            warmup=m.preset.compile_warmup,
        ),
    ),
    "unet-images": (
        "U-Net as channels_last, from images: VAE {vae} + {text} text tower each step",
        lambda m: m.unet("perf.channels_last=true", images=True),
    ),
    "vae": ("VAE {vae} {px} px, bf16", lambda m: m.vae()),
    "clip": ("CLIP {clip} {clip_px} px, bf16", lambda m: m.clip()),
}
# The order they run in: the compile last (the slowest to start, and it compiles the shared net).
RUN_ORDER = [name for name in ROWS if name != "unet-compile"] + ["unet-compile"]


def row_title(name: str, preset: Preset) -> str:
    text = "ViT-L/14-sized" if preset.text == VIT_L14_TEXT else "tiny"
    return ROWS[name][0].format(
        unet=preset.unet,
        vae=preset.vae,
        clip=preset.clip,
        px=preset.image_size,
        clip_px=preset.clip_image_size,
        text=text,
        backend=preset.compile_backend,
    )
