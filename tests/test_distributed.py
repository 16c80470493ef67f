"""Exports under sharded weights (ldm_train.distributed): every rank gathers, rank 0 writes.

- torch's FSDP2 (fully_shard) on 2 gloo processes through export_stage, for every stage: the
  export holds the gathered weights, every rank gets its folder, and a gather run by rank 0 alone
  fails fast (what a rank-0-only export did) instead of passing or hanging.
- Lightning's FSDPStrategy (trainer=fsdp, FULL_SHARD) through the real CLI on 2 CPU processes
  (CpuFSDPStrategy): the export equals the checkpoint's full weights, and so does an export of
  that checkpoint in one process.
This file is also the FSDP2 worker: `python -m test_distributed MODE OUT_DIR` (tests/ on the path)
as one rank.
"""

from __future__ import annotations

import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ldm_train.config import compose_config
from ldm_train.distributed import export_stage, from_rank_zero, is_sharded
from ldm_train.export import export_checkpoint
from ldm_train.train import build

PIXEL_UNET = ["stage=unet", "stage.vae=null", "stage.text_encoder=null", "model.ema_decay=null"]
QUICK = [  # few, short validation samples: they check the wiring
    "stage.module.validation.samples_per_prompt=1",
    "stage.module.validation.metric_images=4",
    "stage.module.validation.sampling.steps=2",
]
CPU_FSDP = [
    "trainer=fsdp",
    "trainer.accelerator=cpu",
    "trainer.devices=2",
    "trainer.precision=32-true",
    "trainer.strategy._target_=ldm_train.distributed.CpuFSDPStrategy",
]


STAGES = {  # each stage's config here, and where its export keeps the trained net's weights
    "unet": (PIXEL_UNET, "unet/diffusion_pytorch_model.safetensors"),
    "vae": (["stage=vae"], "diffusion_pytorch_model.safetensors"),
    "clip": (["stage=clip"], "open_clip_model.safetensors"),
}


def shard_and_export(stage: str, out: Path, every_rank: bool) -> None:
    """The stage sharded by torch's FSDP2 as trainer=fsdp wraps it (one unit per block, then the
    net), exported through export_stage by every rank (or by rank 0 alone), the export checked."""
    import torch.distributed as dist
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.resnet import ResnetBlock2D
    from open_clip.transformer import ResidualAttentionBlock
    from torch.distributed.fsdp import fully_shard

    overrides, weights_file = STAGES[stage]
    cfg = compose_config(overrides)
    torch.manual_seed(0)  # the same weights on both ranks before sharding
    module = build(cfg.stage.module)
    with torch.no_grad():  # weights a fresh build does not have: only the gather can bring them
        for parameter in module.parameters():
            parameter.add_(1.0)
    expected = {k: v.clone() for k, v in module.net.state_dict().items()}
    for block in module.net.modules():
        if isinstance(block, ResnetBlock2D | BasicTransformerBlock | ResidualAttentionBlock):
            fully_shard(block)
    scalars = {p for p in module.net.parameters() if p.dim() == 0}  # FSDP2 cannot shard them
    fully_shard(module.net, ignored_params=scalars)  # (CLIP's logit_scale): kept whole
    assert is_sharded(module)
    rank = dist.get_rank()
    if not every_rank and rank != 0:
        return  # this rank skips the export, as a rank-0-only export did
    try:
        exported = export_stage(module, out / stage, lambda: build(cfg.stage.module))
    except Exception as error:
        print(f"rank {rank} failed: {type(error).__name__}", flush=True)
        sys.exit(3)
    print(f"rank {rank} exported {exported}", flush=True)
    if rank == 0:
        written = load_file(exported / weights_file)
        assert written.keys() == expected.keys()
        assert all(torch.equal(written[k], expected[k]) for k in expected)
        print(f"{stage} weights match", flush=True)


def worker(mode: str, out: Path) -> None:
    """One rank of the FSDP2 check (RANK, WORLD_SIZE, MASTER_* in the environment): every stage,
    or the U-Net exported by rank 0 alone."""
    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    for stage in STAGES if mode == "every-rank" else ["unet"]:
        shard_and_export(stage, out, every_rank=mode == "every-rank")
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["every-rank", "rank-0-alone"])
def test_fully_sharded_weights_are_gathered_on_every_rank(mode, tmp_path, free_port, run_together):
    port = str(free_port())
    ranks = [
        (
            ["-m", "test_distributed", mode, str(tmp_path / "export")],
            dict(RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
        )
        for r in range(2)
    ]
    (code0, out0), (code1, out1) = run_together(ranks, tmp_path, timeout=300)
    if mode == "every-rank":
        assert code0 == 0 and code1 == 0, (out0 + out1)[-4000:]
        for stage in STAGES:
            assert f"{stage} weights match" in out0
            folder = tmp_path / "export" / stage
            assert f"rank 0 exported {folder}" in out0 and f"rank 1 exported {folder}" in out1
    else:  # a collective on one rank fails (the peer left): it neither passes nor hangs
        assert code0 == 3 and "rank 0 failed" in out0, out0[-4000:]
        assert not (tmp_path / "export").exists()


@pytest.mark.slow
def test_trainer_fsdp_exports_the_gathered_weights(tmp_path, tiny_overrides, run_cli):
    """Validation samples included: each rank draws its share with the root's weights gathered."""
    args = ["-m", "ldm_train", *tiny_overrides(tmp_path / "outputs"), *PIXEL_UNET, *QUICK]
    run_cli([*args, *CPU_FSDP, "trainer.max_steps=2", "data.batches_per_epoch=2"], tmp_path)
    run_dir = tmp_path / "outputs" / "shapes" / "unet"
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 2
    weights = load_file(run_dir / "export" / STAGES["unet"][1])
    assert len(weights) == len([k for k in checkpoint["state_dict"] if k.startswith("net.")])
    assert all(torch.equal(checkpoint["state_dict"][f"net.{k}"], v) for k, v in weights.items())
    # The full checkpoint written under FSDP exports in one process, without FSDP, the same.
    again = load_file(export_checkpoint(run_dir, tmp_path / "again") / STAGES["unet"][1])
    assert again.keys() == weights.keys()
    assert all(torch.equal(again[k], v) for k, v in weights.items())
    # (Not resumed here: torch's FSDP1 gathers every optimizer state into one buffer, which on a
    # CPU it does not copy out, so a CPU FSDP checkpoint holds exp_avg == exp_avg_sq. On a GPU
    # the copy happens: `make gpu-check` resumes an FSDP checkpoint there.)


def test_rank_zero_errors_reach_the_caller_and_plain_modules_are_not_sharded():
    assert not is_sharded(torch.nn.Linear(2, 2))
    assert from_rank_zero(lambda: 7) == 7
    with pytest.raises(ZeroDivisionError):
        from_rank_zero(lambda: 1 / 0)


if __name__ == "__main__":
    worker(sys.argv[1], Path(sys.argv[2]))
