"""DDP through the real CLI: every stage trains with 2 CPU processes (gloo, strategy ddp), the ranks
train on disjoint samples, a NaN loss on one rank skips the step on both, and a checkpoint written
under DDP resumes on one process."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

pytestmark = pytest.mark.slow

DDP = [
    "trainer=ddp",
    "trainer.accelerator=cpu",
    "trainer.devices=2",
    "trainer.precision=32-true",
]
NAN_ON_RANK_1 = f"+callbacks.nan={{_target_:{__name__}.NanOnRank1}}"
STAGES = {
    "clip": [],
    "vae": [  # the discriminator on: two optimizers in manual optimization
        NAN_ON_RANK_1,  # (the VAE's loss is per rank: CLIP's gathers features from both ranks)
        "stage.module.loss.disc_weight=0.5",
        "stage.module.loss.discriminator.channels=8",
        "stage.module.loss.discriminator.n_layers=2",
    ],
    "unet": [],  # unet_overrides: the tiny upstream exports, quick samples
    "unet-transformer": ["model=unet/dit_tiny", "model.net.num_layers=2"],  # flow, SD3's MMDiT
}


def write_rank_record(trainer: L.Trainer, name: str, record: Any) -> None:
    """<run_dir>/<name>-rank<N>.json: what a test's callback saw on this rank, for the test."""
    path = Path(trainer.default_root_dir) / f"{name}-rank{trainer.global_rank}.json"
    path.write_text(json.dumps(record))


def read_rank_records(run_dir: Path, name: str, ranks: int = 2) -> list:
    """What write_rank_record wrote on each rank of a run, by rank."""
    return [json.loads((run_dir / f"{name}-rank{rank}.json").read_text()) for rank in range(ranks)]


class KeyRecorder(L.Callback):
    """Writes the sample keys each rank trained on to <run_dir>/keys-rank<N>.json (what record()
    makes of them: a subclass may add more)."""

    name = "keys"

    def __init__(self) -> None:
        self.keys: list[str] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.keys.extend(batch["key"])

    def record(self, trainer: L.Trainer) -> Any:
        return self.keys

    def on_train_end(self, trainer, pl_module) -> None:
        write_rank_record(trainer, self.name, self.record(trainer))


class NanOnRank1(L.Callback):
    """Turns rank 1's images of step 1 into NaN: its loss only is NaN."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_rank == 1 and trainer.global_step == 1:
            batch["image"].fill_(float("nan"))


@pytest.fixture
def cli(tmp_path: Path, tiny_overrides, run_cli):
    def run(*extra: str) -> subprocess.CompletedProcess:
        args = [
            "-m",
            "ldm_train",
            *tiny_overrides(tmp_path / "outputs"),
            "data.batches_per_epoch=2",
            "trainer.limit_val_batches=1",
            f"+callbacks.keys={{_target_:{__name__}.KeyRecorder}}",
            *extra,
        ]
        return run_cli(args, tmp_path)

    return run


def last_checkpoint(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)


def global_step(run_dir: Path) -> int:
    return last_checkpoint(run_dir)["global_step"]


@pytest.mark.parametrize("stage", list(STAGES))
def test_stage_trains_on_two_processes_with_disjoint_data(stage, tmp_path, cli, unet_overrides):
    name = stage.split("-")[0]
    options = [f"stage={name}", *STAGES[stage], *(unet_overrides if name == "unet" else [])]
    cli(*options, *DDP, "trainer.max_steps=2")
    run_dir = tmp_path / "outputs" / "shapes" / name
    assert global_step(run_dir) == 2
    assert any((run_dir / "export").iterdir())  # every rank entered the export, rank 0 wrote it
    keys = read_rank_records(run_dir, "keys")
    assert len(keys[0]) == len(keys[1]) == 2 * 8  # 2 steps of 8 samples on each rank
    assert not set(keys[0]) & set(keys[1])  # 4 shards: each rank reads 2 of its own
    if NAN_ON_RANK_1 in options:  # both ranks skipped step 1, so rank 0's weights stay finite
        checkpoint = last_checkpoint(run_dir)
        assert checkpoint["callbacks"]["NonFiniteLossGuard"]["skipped"] == 1
        weights = checkpoint["state_dict"].values()
        assert all(torch.isfinite(w).all() for w in weights if w.is_floating_point())
    if stage == "vae":  # the DDP checkpoint (both optimizers) goes on in one process
        result = cli(*options, "trainer.max_steps=3")
        assert (
            f"continuing from {run_dir / 'checkpoints' / 'last.ckpt'}"
            in result.stdout + result.stderr
        )
        assert global_step(run_dir) == 3
