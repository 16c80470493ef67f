"""Faults during training: a NaN/inf loss skips its step (weights unchanged), is counted and logged,
too many in a row stop the run with one line; no checkpoint holds NaN weights; fit ends with
last.ckpt at the final step, and rerunning a finished run trains no more."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf, open_dict

import ldm_train.train as train_module
from ldm_train.callbacks.nonfinite import (
    NonFiniteLossError,
    NonFiniteLossGuard,
    NonFiniteWeightsError,
)
from ldm_train.errors import UserError
from ldm_train.train import train

pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log")

STAGES = {
    "clip": [],  # automatic optimization
    "vae": [  # manual optimization: autoencoder and discriminator steps
        "stage.module.loss.disc_weight=0.5",
        "stage.module.loss.discriminator.channels=8",
        "stage.module.loss.discriminator.n_layers=2",
    ],
    "unet": [  # in pixel space, unconditional; 16 px keeps its attention cheap
        "stage.vae=null",
        "stage.text_encoder=null",
        "stage.module.validation.samples_per_prompt=0",
        "data.image_size=16",
    ],
}


class NanBatches(L.Callback):
    """Turns the images of the batches at `bad_steps` into NaN and records, per step, whether the
    parameters changed."""

    def __init__(self, bad_steps: set[int]) -> None:
        self.bad_steps = bad_steps
        self.changed: dict[int, bool] = {}
        self._before: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step in self.bad_steps:
            batch["image"].fill_(float("nan"))
        self._before = [p.detach().clone() for p in pl_module.parameters()]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        after = list(pl_module.parameters())
        same = all(torch.equal(a, b) for a, b in zip(self._before, after, strict=True))
        self.changed[trainer.global_step - 1] = not same


def with_callback(monkeypatch, callback: L.Callback) -> None:
    """train() builds its callbacks from the config; add one object the test can inspect."""
    original = train_module.build_callbacks
    monkeypatch.setattr(
        train_module, "build_callbacks", lambda cfg, logger: [*original(cfg, logger), callback]
    )


def logged(run_dir: Path, name: str) -> list[float]:
    (metrics,) = (run_dir / "csv").glob("version_*/metrics.csv")
    with open(metrics) as f:
        return [float(row[name]) for row in csv.DictReader(f) if row.get(name)]


@pytest.mark.parametrize("stage", list(STAGES))
def test_nonfinite_loss_skips_the_step_and_is_counted(stage, make_cfg, monkeypatch):
    nan = NanBatches(bad_steps={2, 3})
    with_callback(monkeypatch, nan)
    cfg = make_cfg(
        f"stage={stage}",
        *STAGES[stage],
        "trainer.log_every_n_steps=1",
        "trainer.max_steps=5",
        "data.batches_per_epoch=5",
        "trainer.limit_val_batches=0",
        "max_nonfinite_steps=3",
    )
    _, objects = train(cfg)
    assert objects["trainer"].global_step == 5  # a skipped step still counts as a step
    # (Step 0 has learning rate 0 at the start of the warmup.)
    assert [nan.changed[step] for step in (1, 2, 3, 4)] == [True, False, False, True]
    assert logged(objects["run_dir"], "train/nonfinite_steps") == [0, 0, 1, 2, 2]
    state = torch.load(objects["run_dir"] / "checkpoints" / "last.ckpt", weights_only=False)
    assert all(
        torch.isfinite(t).all() for t in state["state_dict"].values() if t.is_floating_point()
    )
    (guard,) = [c for c in objects["trainer"].callbacks if isinstance(c, NonFiniteLossGuard)]
    assert guard.state_dict() == {"skipped": 2, "in_row": 0}


def test_nonfinite_losses_in_a_row_stop_the_run(make_cfg, monkeypatch):
    with_callback(monkeypatch, NanBatches(bad_steps=set(range(1, 100))))
    cfg = make_cfg(
        "stage=vae",
        "trainer.max_steps=20",
        "data.batches_per_epoch=20",
        "trainer.limit_val_batches=0",
        "max_nonfinite_steps=3",
        "checkpoint_every_n_steps=1",
    )
    with pytest.raises(NonFiniteLossError) as caught:
        train(cfg)
    message = str(caught.value)
    assert "NaN/inf for 3 steps in a row (up to step 4" in message and "\n" not in message
    assert isinstance(caught.value, UserError)  # the CLI prints it as one line, exit code 2
    checkpoints = Path(cfg.paths.run_dir) / "checkpoints"
    # The row's steps saved checkpoints of the unchanged weights; the step that stopped did not.
    assert torch.load(checkpoints / "last.ckpt", weights_only=False)["global_step"] == 3


def test_bad_max_nonfinite_steps_is_one_line(make_cfg):
    with pytest.raises(UserError, match=r"max_nonfinite_steps=0 must be an integer >= 1"):
        train(make_cfg("max_nonfinite_steps=0"))


class Linear(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Linear(2, 1)
        self.norm = torch.nn.BatchNorm1d(1)
        self.register_buffer("mask", torch.tensor([0.0, float("-inf")]))  # -inf on purpose


def test_checkpoint_with_nonfinite_weights_is_not_written(tmp_path):
    trainer = L.Trainer(callbacks=[NonFiniteLossGuard()], logger=False, enable_checkpointing=False)
    module = Linear()
    trainer.strategy.connect(module)
    trainer.state.fn = "fit"
    trainer.save_checkpoint(tmp_path / "good.ckpt")
    for tensor in (module.net.weight, module.norm.running_mean):  # a parameter, a NaN statistic
        original = tensor.clone()
        with torch.no_grad():
            tensor.view(-1)[0] = float("nan")
        with pytest.raises(NonFiniteWeightsError, match=r"1 weight tensor\(s\) hold NaN/inf"):
            trainer.save_checkpoint(tmp_path / "bad.ckpt")
        with torch.no_grad():
            tensor.copy_(original)
    assert (tmp_path / "good.ckpt").is_file() and not (tmp_path / "bad.ckpt").exists()


def test_fit_ends_with_last_checkpoint_at_the_final_step_and_a_rerun_trains_no_more(make_cfg):
    from test_resume import Recorder  # a tiny model that remembers its batches

    def run(steps: int, *extra: str) -> Recorder:
        cfg = make_cfg(
            f"trainer.max_steps={steps}",
            "data.batches_per_epoch=5",
            "checkpoint_every_n_steps=5",
            *extra,
        )
        with open_dict(cfg):
            cfg.stage.module = OmegaConf.create({"_target_": "test_resume.Recorder"})
        _, objects = train(cfg)
        return objects

    first = run(7)
    checkpoints = first["run_dir"] / "checkpoints"
    assert torch.load(checkpoints / "last.ckpt", weights_only=False)["global_step"] == 7
    assert {p.name for p in checkpoints.glob("step*.ckpt")} == {"step00000005.ckpt"}
    again = run(7)  # the same command: the run is finished
    assert again["trainer"].global_step == 7 and again["module"].seen == []
    # Going on from the end checkpoint continues the data stream where it stopped.
    more = run(12)
    straight = run(12, "experiment_name=straight")
    assert first["module"].seen + more["module"].seen == straight["module"].seen
    assert isinstance(first["module"], Recorder)


def test_final_checkpoint_goes_on_from_the_trained_weights_not_the_ema(make_cfg):
    cfg = make_cfg(
        "stage=unet",
        *STAGES["unet"],
        "trainer.max_steps=3",
        "checkpoint_every_n_steps=2",
        "trainer.limit_val_batches=0",
    )
    _, objects = train(cfg)
    state = torch.load(objects["run_dir"] / "checkpoints" / "last.ckpt", weights_only=False)
    assert state["global_step"] == 3
    # state_dict: the EMA (what export and validation use); current_model_state: the trained
    # weights a resumed run goes on from. Fit ends by copying the EMA into the model.
    trained, ema = state["current_model_state"], state["state_dict"]
    assert any(not torch.equal(trained[k], ema[k]) for k in ema if k.startswith("net."))
    module = objects["module"].state_dict()
    assert all(torch.equal(module[k], ema[k]) for k in ema if k.startswith("net."))
