"""Exact resume of the data stream: a run stopped at step k and resumed sees the same batches, in
the same order, as a run that never stopped, and ends with the same weights."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import lightning as L
import pytest
import safetensors.torch
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from ldm_train.rundir import RunDir
from ldm_train.train import train


class Recorder(L.LightningModule):
    """A tiny model that remembers the keys of every batch it trained on."""

    def __init__(self, delay: float = 0.0) -> None:
        super().__init__()
        self.net = torch.nn.Linear(3, 1)
        self.seen: list[list[str]] = []
        self.delay = delay  # seconds per step, so that a test can kill the run mid-way

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        time.sleep(self.delay)
        self.seen.append(list(batch["key"]))
        return (self.net(batch["image"].mean(dim=(2, 3))) - 1).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=0.01)

    def export(self, out_dir):
        out_dir.mkdir(parents=True, exist_ok=True)
        torch.save(self.net.state_dict(), out_dir / "weights.pt")
        return out_dir


class KillAt(L.Callback):
    """kill -9 of its own process after the given step (nothing gets to clean up)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def train_recorder(
    compose: Callable[..., DictConfig], recorder: type, steps: int, workers: int, *extra: str
) -> L.LightningModule:
    """The trained module of a run of `recorder` (a test's LightningModule that records what it
    saw) in place of the stage's module: `steps` steps on `workers` loader workers, 5 batches an
    epoch, random flips and crops on. compose: make_cfg or mixed_cfg; extra: more overrides."""
    cfg = compose(
        f"trainer.max_steps={steps}",
        f"data.num_workers={workers}",
        "data.batches_per_epoch=5",
        "data.random_flip=true",
        "data.crop=random",
        *extra,
    )
    with open_dict(cfg):
        target = f"{recorder.__module__}.{recorder.__qualname__}"
        cfg.stage.module = OmegaConf.create({"_target_": target})
    return train(cfg)[1]["module"]


def assert_same_parameters(a: torch.nn.Module, b: torch.nn.Module) -> None:
    """Bitwise the same weights: a resumed run's against those of a run that never stopped."""
    for x, y in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(x, y)


def run(make_cfg, steps: int, workers: int, *extra: str) -> Recorder:
    return train_recorder(make_cfg, Recorder, steps, workers, "data.image_size=28", *extra)


@pytest.mark.parametrize("workers", [0, 2])
# At an epoch's end, one step into the next (with 2 workers the second worker has not started its
# epoch yet: its state must say so) and in the middle of one.
@pytest.mark.parametrize("stop", [5, 6, 7])
def test_resumed_run_sees_the_same_data_and_ends_with_the_same_weights(make_cfg, workers, stop):
    straight = run(make_cfg, 12, workers, "experiment_name=straight")
    first = run(make_cfg, stop, workers, "experiment_name=cut", f"checkpoint_every_n_steps={stop}")
    resumed = run(make_cfg, 12, workers, "experiment_name=cut", "checkpoint_every_n_steps=100")
    assert len(straight.seen) == 12 and len(first.seen) == stop
    assert first.seen + resumed.seen == straight.seen
    assert_same_parameters(straight, resumed)


def test_a_damaged_last_checkpoint_resumes_from_the_newest_good_one_exactly(make_cfg):
    straight = run(make_cfg, 12, 0, "experiment_name=straight")
    first = run(make_cfg, 8, 0, "experiment_name=cut", "checkpoint_every_n_steps=4")
    last = RunDir.of_stage(make_cfg().paths.output_root, "cut", "clip").last_checkpoint
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # killed during the write
    resumed = run(make_cfg, 12, 0, "experiment_name=cut", "checkpoint_every_n_steps=4")
    assert first.seen + resumed.seen == straight.seen  # from step00000008.ckpt
    assert_same_parameters(straight, resumed)


STAGE_RUNS = {
    "clip": ["stage=clip", "model.net.text_cfg.layers=1"],
    "vae": ["stage=vae"],
    "vae-gan": [
        "stage=vae",
        "stage.module.loss.disc_weight=0.5",
        "stage.module.loss.discriminator.channels=8",
        "stage.module.loss.discriminator.n_layers=2",
    ],
    "unet": [],  # + unet_overrides
    "unet-flow": [  # flow matching, logit-normal timesteps, a shift
        "model.prediction_type=flow",
        "model.snr_gamma=null",
        "stage.module.loss.timesteps=logit_normal",
        "stage.module.noise_scheduler.shift=3.0",
    ],
    "unet-transformer": ["model=unet/dit_tiny", "model.net.num_layers=2"],  # SD3's MMDiT, flow
}


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGE_RUNS)
def test_kill_9_and_resume_is_exact_for_every_stage(
    stage, tmp_path, tiny_overrides, unet_overrides, run_cli
):
    """Through the real CLI: the export of a run killed with -9 after step 3 (checkpoint at 2) and
    rerun equals the export of a run that never stopped, bit for bit."""
    unet = stage.startswith("unet")
    options = [*(unet_overrides if unet else []), *STAGE_RUNS[stage]]
    base = ["-m", "ldm_train", *tiny_overrides(tmp_path / "out"), *options, "trainer.max_steps=6"]
    base += [
        "checkpoint_every_n_steps=2",
        "trainer.limit_val_batches=0",
        "data.batches_per_epoch=4",
    ]
    run_cli([*base, "experiment_name=straight"], tmp_path)
    killed = [*base, "experiment_name=killed"]
    result = run_cli(
        [*killed, f"+callbacks.kill={{_target_:{__name__}.KillAt,step:3}}"], tmp_path, check=False
    )
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    rerun = run_cli(killed, tmp_path)
    assert "continuing from" in rerun.stdout + rerun.stderr
    name = "unet" if unet else STAGE_RUNS[stage][0].removeprefix("stage=")
    exports = [
        tmp_path / "out" / experiment / name / "export" for experiment in ("straight", "killed")
    ]
    files = sorted(p.relative_to(exports[0]) for p in exports[0].rglob("*.safetensors"))
    assert files
    for file in files:
        a, b = (safetensors.torch.load_file(export / file) for export in exports)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), file


@pytest.fixture
def cli(tmp_path: Path, tiny_shards, start_cli):
    """The real CLI training a Recorder (0.15 s a step) on the tiny shards, 2 loader workers."""

    def start(name: str, *extra: str) -> subprocess.Popen:
        args = [
            "-m",
            "ldm_train",
            f"experiment_name={name}",
            "logger=csv",
            "trainer.accelerator=cpu",
            f"paths.output_root={tmp_path}",
            f"data.train_urls='{tiny_shards['train_urls']}'",
            f"data.val_urls='{tiny_shards['val_urls']}'",
            "data.make_dataset=null",
            "data.num_workers=2",
            "data.batch_size=8",
            "data.batches_per_epoch=5",
            "trainer.max_steps=16",
            "trainer.enable_progress_bar=false",
            "checkpoint_every_n_steps=2",
            "~stage.module",
            f"+stage.module={{_target_:{__name__}.Recorder,delay:0.15}}",
            *extra,
        ]
        return start_cli(args, tmp_path)

    return start


def finish(process: subprocess.Popen) -> str:
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output[-3000:]
    return output


@pytest.mark.slow
def test_kill_9_then_rerun_ends_with_the_weights_of_an_uninterrupted_run(tmp_path, cli, wait_for):
    finish(cli("straight"))  # 2 loader workers
    killed = cli("killed", "keep_last_checkpoints=-1")
    # The kill lands before or after last.ckpt moves from step 6 to 8 (or 10): each must resume
    # exactly (step 6, one step into an epoch, once did not with 2 workers).
    wait_for(tmp_path / "killed" / "clip" / "checkpoints" / "step00000008.ckpt", killed)
    killed.send_signal(signal.SIGKILL)  # kill -9: nothing gets to clean up
    killed.wait()
    output = finish(cli("killed"))  # the same command again
    assert "resume=auto: continuing from" in output
    straight = torch.load(tmp_path / "straight" / "clip" / "export" / "weights.pt")
    resumed = torch.load(tmp_path / "killed" / "clip" / "export" / "weights.pt")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM])  # SIGUSR1: tests/test_signals.py
def test_preemption_signal_saves_a_checkpoint_and_exits_cleanly(tmp_path, cli, signum, wait_for):
    run_dir = tmp_path / "preempted" / "clip"
    process = cli("preempted")
    wait_for(run_dir / "checkpoints" / "step00000004.ckpt", process)
    process.send_signal(signum)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output[-3000:]
    step = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"]
    assert 4 <= step < 16
    assert f"saved {run_dir / 'checkpoints' / 'last.ckpt'} at step {step}" in output
    output = finish(cli("preempted"))
    assert f"continuing from {run_dir / 'checkpoints' / 'last.ckpt'}" in output
