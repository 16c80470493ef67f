"""LoRA (adapter=lora) against full fine-tuning of the same U-Net at the same batch: trainable
parameters, checkpoint size, step time and peak memory, as ratios. Both start from the same
pretrained U-Net (the tiny preset's, saved as a folder: model.pretrained), on the tiny VAE and
CLIP, batch 32 of the shapes data, without EMA (LoRA trains without one). Step times alternate
LoRA and full fits in one process (best of RUNS); peak memory is each in a fresh process (the
peak RSS never goes down): the rise of the peak over the process before fit, i.e. gradients,
optimizer states and activations (CUDA's peak allocation on a GPU).

    python -m benchmarks.lora      (part of make bench; the concept figures: benchmarks.concept)
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from hydra.utils import instantiate

from benchmarks.common import (
    alternate,
    best,
    fit_rates,
    make_data,
    setup_process,
    stage_config,
    write_upstream,
)
from benchmarks.memory import BeforeFit, fresh_process_main, peak_rss_mib, run_fresh
from ldm_train.data.datamodule import WebDataModule
from ldm_train.train import build

VARIANTS = {
    "lora": ["adapter=lora", "model.ema_decay=null"],
    "full": ["model.ema_decay=null"],
}
RUNS, STEPS, WARMUP = 3, 20, 3


def setup(tmp: Path) -> tuple[Path, list[str]]:
    """The data, and the overrides of a U-Net run on the upstream parts from a saved U-Net."""
    root = make_data(tmp / "shapes-32", n_train=1024)
    upstream = {"vae": tmp / "upstream" / "vae", "clip": tmp / "upstream" / "clip"}
    if not upstream["clip"].is_dir():  # made once, read by the child processes too
        upstream = write_upstream(tmp / "upstream")
    parts = [f"stage.vae={upstream['vae']}", f"stage.text_encoder={upstream['clip']}"]
    base = tmp / "base"
    if not base.is_dir():
        module = build(stage_config("unet", root, tmp / "out", *parts).stage.module)
        module.net.save_pretrained(base)
    return root, [*parts, f"model.pretrained={base}", "data.num_workers=0"]


def config(variant: str, tmp: Path, root: Path, overrides: list[str]):
    return stage_config("unet", root, tmp / "out" / variant, *overrides, *VARIANTS[variant])


def checkpoint_mib(cfg, tmp: Path) -> tuple[float, int]:
    """(a checkpoint's size after one step, with the optimizer's states; trainable parameters)."""
    module = build(cfg.stage.module)
    trainer = instantiate(
        cfg.trainer, max_steps=1, logger=False, enable_checkpointing=False, callbacks=[]
    )
    trainer.fit(module, datamodule=WebDataModule.from_config(cfg.data))
    path = tmp / "one.ckpt"
    trainer.save_checkpoint(path)
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return path.stat().st_size / 2**20, trainable


def peak_memory(variant: str, tmp: Path) -> float:
    """In a child process: the rise of the peak memory (MiB) over 3 steps of the variant."""
    lines, errors = run_fresh("benchmarks.lora", "--memory", variant, tmp, "peak")
    if not lines:
        raise RuntimeError(f"benchmarks.lora --memory {variant} failed:\n{errors}")
    return float(lines[0].split()[1])


def measure_memory(variant: str, tmp: Path) -> None:
    setup_process()
    root, overrides = setup(tmp)
    cfg = config(variant, tmp, root, overrides)
    cuda = torch.cuda.is_available()
    probe = BeforeFit()
    accelerator = "gpu" if cuda else "cpu"
    trainer = instantiate(
        cfg.trainer,
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        callbacks=[probe],
        accelerator=accelerator,
    )
    trainer.fit(build(cfg.stage.module), datamodule=WebDataModule.from_config(cfg.data))
    rise = torch.cuda.max_memory_allocated() / 2**20 if cuda else peak_rss_mib() - probe.before
    print(f"peak {rise:.1f}", flush=True)


def main() -> None:
    setup_process()
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        root, overrides = setup(tmp)
        cfgs = {variant: config(variant, tmp, root, overrides) for variant in VARIANTS}
        sizes = {variant: checkpoint_mib(cfg, tmp) for variant, cfg in cfgs.items()}
        rates = alternate(
            RUNS, *(lambda c=c: fit_rates(c, STEPS, WARMUP).cpu for c in cfgs.values())
        )
        speed = dict(zip(VARIANTS, map(best, rates), strict=True))
        memory = {variant: peak_memory(variant, tmp) for variant in VARIANTS}
    batch = cfgs["lora"].data.batch_size
    print(f"lora vs full fine-tuning, U-Net tiny preset, batch {batch} (CPU, {RUNS} runs each):")
    lora, full = sizes["lora"], sizes["full"]
    print(f"  trainable parameters: {lora[1]:,} vs {full[1]:,} = {lora[1] / full[1]:.4f}x")
    print(f"  checkpoint: {lora[0]:.2f} MiB vs {full[0]:.2f} MiB = {lora[0] / full[0]:.3f}x")
    print(
        f"  steps per CPU second: {speed['lora']:.2f} vs {speed['full']:.2f} = "
        f"{speed['lora'] / speed['full']:.2f}x"
    )
    unit = "CUDA peak allocated" if torch.cuda.is_available() else "peak RSS rise during fit"
    print(
        f"  {unit}: {memory['lora']:.0f} MiB vs {memory['full']:.0f} MiB = "
        f"{memory['lora'] / memory['full']:.2f}x"
    )


if __name__ == "__main__":
    fresh_process_main("--memory", VARIANTS, measure_memory, main)
