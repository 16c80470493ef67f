"""Optimizers and LR schedules are config groups: each choice trains a step in every stage, the
schedules follow diffusers' named ones with a warmup, and a missing extra is a one-line error."""

from __future__ import annotations

import builtins
import math

import pytest
import torch
from diffusers.optimization import get_cosine_schedule_with_warmup
from hydra.utils import instantiate

from ldm_train.config import compose_config
from ldm_train.errors import UserError
from ldm_train.optim import SCHEDULES, adamw8bit, lr_schedule
from ldm_train.train import train

pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log", "ignore::UserWarning")

ONE_STEP = ["trainer.max_steps=1", "trainer.limit_val_batches=0", "logger=none"]
CLIP_SMALL = ["model.net.text_cfg.layers=1", "model.net.embed_dim=32"]
OPTIMIZERS = {
    "adamw": "AdamW",
    "adamw8bit": "AdamW8bit",
    "adafactor": "Adafactor",
    "sgd": "SGD",
}


def needs_bitsandbytes(name: str) -> list:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        if name == "adamw8bit":
            return [pytest.mark.skip(reason="bitsandbytes not installed (pip install -e '.[bnb]')")]
    return []


@pytest.fixture
def stage_cfg(make_cfg, unet_overrides):
    def compose(stage: str, *overrides: str):
        extra = {"unet": unet_overrides, "clip": CLIP_SMALL}.get(stage, [])
        return make_cfg(f"stage={stage}", *extra, *ONE_STEP, *overrides)

    return compose


@pytest.mark.parametrize("stage", ["clip", "vae", "unet"])
@pytest.mark.parametrize("name", [pytest.param(n, marks=needs_bitsandbytes(n)) for n in OPTIMIZERS])
def test_every_optimizer_trains_a_step_in_every_stage(stage, name, stage_cfg):
    schedule = "lr_scheduler=constant" if stage != "vae" else "lr_scheduler=linear"
    cfg = stage_cfg(stage, f"optimizer={name}", schedule)
    before = {k: v.clone() for k, v in instantiate(cfg.stage.module).state_dict().items()}
    metrics, objects = train(cfg)
    optimizer = objects["trainer"].optimizers[0]
    assert type(optimizer).__name__ == OPTIMIZERS[name]
    assert objects["trainer"].global_step == 1
    after = objects["module"].state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if k in after)  # it stepped
    losses = [v for k, v in metrics.items() if k.startswith("train/") and "step" not in k]
    assert losses and all(math.isfinite(v) for v in losses)


@pytest.mark.parametrize("name", SCHEDULES)
def test_every_schedule_warms_up_then_follows_its_shape(name):
    cfg = compose_config(
        ["stage=vae", f"lr_scheduler={name}", "model.warmup_steps=10", "trainer.max_steps=100"]
    )
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = instantiate(cfg.lr_scheduler)(optimizer)
    lrs = []
    for _ in range(100):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert lrs[0] == 0 and lrs[5] == pytest.approx(0.5) and lrs[10] == pytest.approx(1.0)
    if name == "constant":
        assert lrs[-1] == pytest.approx(1.0)
    else:
        assert lrs[-1] < 0.1  # decays towards 0 at trainer.max_steps
    if name == "cosine":  # exactly diffusers' cosine (what the stages used before the groups)
        reference = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        expected = get_cosine_schedule_with_warmup(reference, 10, 100)
        for lr in lrs:
            assert lr == pytest.approx(reference.param_groups[0]["lr"])
            reference.step()
            expected.step()


def test_no_schedule_keeps_the_lr(stage_cfg):
    _, objects = train(stage_cfg("vae", "lr_scheduler=none"))
    assert objects["trainer"].lr_scheduler_configs == []


def test_schedule_errors_are_one_line():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(
        UserError, match="lr_scheduler.name='step' is not valid; choose one of: constant"
    ):
        lr_schedule(optimizer, "step")
    with pytest.raises(UserError, match="set trainer.max_steps, or use lr_scheduler=constant"):
        lr_schedule(optimizer, "cosine", 10, -1)


def test_adamw8bit_without_bitsandbytes_names_the_extra(monkeypatch):
    real_import = builtins.__import__

    def no_bitsandbytes(name, *args, **kwargs):
        if name == "bitsandbytes":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_bitsandbytes)
    with pytest.raises(UserError, match=r"pip install 'ldm_train\[bnb\]'"):
        adamw8bit([torch.nn.Parameter(torch.zeros(4))], lr=1e-3)


def test_presets_keep_their_optimizer_settings():
    clip = instantiate(compose_config(["stage=clip"]).optimizer)
    assert clip.keywords["betas"] == [0.9, 0.98] and clip.keywords["eps"] == 1e-6
    vae = instantiate(compose_config(["stage=vae", "model=vae/sd"]).optimizer)
    assert vae.keywords["betas"] == [0.5, 0.9]
    unet = instantiate(compose_config(["stage=unet"]).optimizer)
    assert unet.keywords["betas"] == [0.9, 0.999] and unet.keywords["fused"] is True
