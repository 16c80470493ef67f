"""Multi-GPU settings that a CPU can check: the FSDP preset (GPU only: here it composes, its
strategy builds, its wrap policy finds the sd15 U-Net's blocks, and the one combination it cannot
run is a one-line error), and what each DDP process may write."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from hydra.utils import instantiate
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_only
from torch.distributed.fsdp import ShardingStrategy

from ldm_train.config import compose_config
from ldm_train.diffusion.denoiser import Sizes, build_denoiser
from ldm_train.errors import UserError
from ldm_train.rundir import RunDir
from ldm_train.train import train, wandb_run_id


def test_fsdp_preset_composes_and_its_strategy_builds():
    cfg = compose_config(["trainer=fsdp", "stage=unet", "model=unet/sd15"])
    assert cfg.trainer.precision == "bf16-mixed" and cfg.trainer.accelerator == "gpu"
    strategy = instantiate(cfg.trainer.strategy)
    assert isinstance(strategy, FSDPStrategy)
    assert strategy.sharding_strategy == ShardingStrategy.FULL_SHARD
    policy = strategy.kwargs["auto_wrap_policy"]
    with torch.device("meta"):  # SD 1.5's U-Net without allocating its 860M weights
        unet = build_denoiser(instantiate(cfg.model.net), Sizes(4, 768, 64, 64))
    wrapped = Counter(type(m).__name__ for m in unet.modules() if type(m) in policy._module_classes)
    assert wrapped == {"ResnetBlock2D": 22, "BasicTransformerBlock": 16}
    with torch.device("meta"):  # SD3 Medium's transformer: one unit per MMDiT block
        dit = instantiate(compose_config(["stage=unet", "model=unet/dit_sd3_medium"]).model.net)
        dit = build_denoiser(dit, Sizes(16, 4096, 128, 128))
    wrapped = Counter(type(m).__name__ for m in dit.modules() if type(m) in policy._module_classes)
    assert wrapped == {"JointTransformerBlock": 24}


def test_fsdp_with_the_unets_ema_is_a_one_line_error(make_cfg):
    cfg = make_cfg(
        "stage=unet",
        "stage.vae=null",
        "stage.text_encoder=null",
        "trainer=fsdp",
        "trainer.accelerator=cpu",
    )
    with pytest.raises(UserError, match="set model.ema_decay=null"):
        train(cfg)


def test_only_rank_0_writes_the_wandb_run_id(tmp_path, monkeypatch):
    # Every DDP process builds the logger; a rank > 0 must not replace the id of rank 0's W&B run.
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    run = RunDir(tmp_path)
    wandb_run_id(run, resuming=False)
    assert not run.wandb_id.exists()
    monkeypatch.setattr(rank_zero_only, "rank", 0)
    run_id = wandb_run_id(run, resuming=False)
    assert run.wandb_id.read_text() == run_id
