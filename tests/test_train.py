"""train(cfg) on tiny shards: every stage fits, checkpoints, logs, resumes and counts bad data."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ldm_train.train import train

LOSS = {"clip": "train/contrastive", "vae": "train/loss", "unet": "train/mse"}


def latest_log(run_dir: Path) -> Path:
    versions = sorted((run_dir / "csv").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    return versions[-1] / "metrics.csv"


def logged(run_dir: Path, name: str) -> list[float]:
    with open(latest_log(run_dir)) as f:
        return [float(row[name]) for row in csv.DictReader(f) if row.get(name)]


# The unet stage on its own, without upstream exports: unconditional, in pixel space.
STANDALONE = {
    "clip": [],
    "vae": [],
    "unet": [
        "stage.vae=null",
        "stage.text_encoder=null",
        "stage.module.validation.samples_per_prompt=0",
        "model.net.block_out_channels=[32,32]",  # 32 px of pixels: the preset's widths take 4x
    ],
}


@pytest.mark.parametrize("stage", ["clip", "vae", "unet"])
def test_stage_trains_checkpoints_and_logs(stage, make_cfg):
    cfg = make_cfg(
        f"stage={stage}",
        *STANDALONE[stage],
        "trainer.log_every_n_steps=1",
        "checkpoint_every_n_steps=2",
    )
    metrics, objects = train(cfg)
    run_dir = objects["run_dir"]
    assert objects["trainer"].global_step == 4
    assert torch.isfinite(torch.tensor(metrics[LOSS[stage]]))
    checkpoints = run_dir / "checkpoints"
    assert torch.load(checkpoints / "last.ckpt", weights_only=False)["global_step"] == 4
    assert {p.name for p in checkpoints.glob("step*.ckpt")} == {
        "step00000002.ckpt",
        "step00000004.ckpt",
    }
    saved = OmegaConf.load(run_dir / "config.yaml")  # resolved: no interpolation left
    assert saved.stage.name == stage and "${" not in OmegaConf.to_yaml(saved)
    assert len(logged(run_dir, LOSS[stage])) == 4
    assert any(key.startswith("val/") for key in metrics)


def test_throughput_and_learning_rate_are_logged(make_cfg):
    # Loss curves are each stage's own tests; here the logging the callbacks add.
    cfg = make_cfg(
        "stage=vae",
        "trainer.max_steps=24",
        "trainer.log_every_n_steps=1",
        "data.batches_per_epoch=24",
        "trainer.limit_val_batches=1",
    )
    _, objects = train(cfg)
    assert min(logged(objects["run_dir"], "train/device/samples_per_sec")) > 0
    with open(latest_log(objects["run_dir"])) as f:
        lr_keys = [k for k in csv.DictReader(f).fieldnames if k.startswith("lr-")]
    assert lr_keys and logged(objects["run_dir"], lr_keys[0])


def test_rerun_resumes_and_resume_never_starts_afresh(make_cfg):
    _, first = train(make_cfg("stage=vae"))
    assert first["trainer"].global_step == 4
    _, resumed = train(
        make_cfg(
            "stage=vae",
            "trainer.max_steps=6",
            "checkpoint_every_n_steps=3",
            "trainer.log_every_n_steps=1",
        )
    )
    assert resumed["trainer"].global_step == 6
    assert len(list((resumed["run_dir"] / "csv").glob("version_*/metrics.csv"))) == 2  # none lost
    checkpoints = resumed["run_dir"] / "checkpoints"
    assert (checkpoints / "step00000006.ckpt").is_file()
    assert torch.load(checkpoints / "last.ckpt", weights_only=False)["global_step"] == 6

    _, fresh = train(make_cfg("stage=vae", "resume=never", "trainer.max_steps=2"))
    assert fresh["trainer"].global_step == 2
    kept = [p for p in fresh["run_dir"].iterdir() if p.name.startswith("checkpoints-")]
    assert kept and (kept[0] / "step00000006.ckpt").is_file()


def test_corrupt_shard_is_skipped_and_counted(make_cfg, tiny_shards, tmp_path):
    good = Path(tiny_shards["root"]) / "train-000000.tar"
    broken = tmp_path / "broken.tar"
    broken.write_bytes(good.read_bytes()[:3000])  # truncated mid-member
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"not a tar at all" * 100)
    shutil.copy(good, tmp_path / "good.tar")
    urls = f"[{tmp_path}/good.tar,{broken},{garbage}]"
    cfg = make_cfg(
        "stage=vae",
        f"data.train_urls={urls}",
        "trainer.max_steps=12",
        "data.batches_per_epoch=12",
        "trainer.log_every_n_steps=1",
    )
    metrics, _ = train(cfg)
    assert metrics["data/skipped"] >= 2


def test_resumed_run_continues_the_same_wandb_run(make_cfg):
    _, first = train(make_cfg("stage=vae", "logger=wandb", "trainer.max_steps=2"))
    _, second = train(make_cfg("stage=vae", "logger=wandb", "trainer.max_steps=3"))
    runs = sorted(p.name for p in (first["run_dir"] / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and runs[0].rsplit("-", 1)[1] == runs[1].rsplit("-", 1)[1]
    _, fresh = train(make_cfg("stage=vae", "logger=wandb", "resume=never", "trainer.max_steps=1"))
    ids = {p.name.rsplit("-", 1)[1] for p in (fresh["run_dir"] / "wandb").glob("offline-run-*")}
    assert len(ids) == 2  # a fresh start is a new W&B run
