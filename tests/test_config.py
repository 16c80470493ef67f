"""The config tree composes for every stage, presets follow the data, bad options are one-line errors."""

from __future__ import annotations

import json
import socket
import subprocess
import time

import pytest
import torch
from hydra.errors import MissingConfigException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ldm_train.config import compose_config, config_dir
from ldm_train.data.datamodule import WebDataModule, expand_urls
from ldm_train.errors import UserError
from ldm_train.rundir import RunDir
from ldm_train.train import validate

STAGES = ["clip", "vae", "unet"]


def test_config_dir_is_the_checkouts_conf():
    assert (config_dir() / "config.yaml").is_file()
    for group in [
        "stage",
        "model",
        "data",
        "trainer",
        "logger",
        "callbacks",
        "paths",
        "experiment",
    ]:
        assert (config_dir() / group).is_dir(), group


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_composes_and_builds(stage, make_cfg):
    # The unet stage on its own, without upstream exports: unconditional, in pixel space.
    standalone = ["stage.vae=null", "stage.text_encoder=null"] if stage == "unet" else []
    cfg = make_cfg(f"stage={stage}", *standalone)
    OmegaConf.resolve(cfg)  # every interpolation resolves
    assert cfg.stage.name == stage
    assert cfg.paths.run_dir.endswith(f"shapes/{stage}")
    validate(cfg)
    module = instantiate(cfg.stage.module)
    assert sum(p.numel() for p in module.parameters()) > 10_000
    assert WebDataModule.from_config(cfg.data).loader.batch_size == 8


def test_model_presets_take_sizes_from_data():
    sizes = {
        "clip": lambda c: c.model.net.vision_cfg.image_size,
        "vae": lambda c: c.model.net.sample_size,
    }
    for stage, size in sizes.items():
        cfg = compose_config([f"stage={stage}", "data.image_size=48"])
        assert size(cfg) == 48
        assert cfg.data.root.endswith("shapes-48")  # the embedded dataset is made at that size
    # The U-Net's sizes come from its upstream parts when it is built: here, pixel space.
    cfg = compose_config(
        ["stage=unet", "data.image_size=48", "stage.vae=null", "stage.text_encoder=null"]
    )
    assert instantiate(cfg.stage.module).net.config.sample_size == 48


def test_defaults_are_the_documented_ones():
    cfg = compose_config([])
    assert cfg.stage.name == "clip" and cfg.data.name == "shapes"
    assert cfg.experiment_name == "shapes" and cfg.resume == "auto" and cfg.ckpt_path is None
    assert cfg.logger._target_.endswith("WandbLogger")
    assert cfg.callbacks.checkpoint.every_n_train_steps == cfg.checkpoint_every_n_steps
    assert len(expand_urls(cfg.data.train_urls)) == cfg.data.make_dataset.train_shards
    assert len(expand_urls(cfg.data.val_urls)) == cfg.data.make_dataset.val_shards


@pytest.mark.parametrize("logger", ["wandb", "csv", "tensorboard", "none"])
def test_logger_choices_compose(logger):
    cfg = compose_config([f"logger={logger}"])
    assert (logger == "none") == (not cfg.logger)


def test_experiment_overrides_only_what_changes():
    base, exp = compose_config([]), compose_config(["experiment=shapes_64"])
    assert exp.data.image_size == 64 and exp.experiment_name == "shapes-64"
    assert exp.paths.run_dir == "outputs/shapes-64/clip"
    assert exp.model.lr == base.model.lr and exp.seed == base.seed


def test_unknown_stage_lists_the_valid_ones():
    with pytest.raises(MissingConfigException) as error:
        compose_config(["stage=diffusion"])
    assert all(stage in str(error.value) for stage in STAGES)


def test_unknown_trainer_option_lists_valid_ones():
    cfg = compose_config(["+trainer.max_stepz=3"])
    with pytest.raises(
        UserError, match=r"trainer\.max_stepz \(did you mean trainer\.max_steps\?\).*precision"
    ):
        validate(cfg)


def test_bad_resume_mode_is_a_one_line_error():
    with pytest.raises(UserError, match="resume='sometimes'.*auto, force, never"):
        validate(compose_config(["resume=sometimes"]))


def test_missing_ckpt_path_names_the_path(tmp_path):
    cfg = compose_config([f"ckpt_path={tmp_path}/nope.ckpt"])
    with pytest.raises(UserError, match=f"{tmp_path}/nope.ckpt does not exist"):
        RunDir(tmp_path).resume_checkpoint(cfg.resume, cfg.ckpt_path)


def test_resume_auto_finds_last_and_never_keeps_old_checkpoints(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    torch.save({"global_step": 3}, checkpoints / "last.ckpt")
    run = RunDir(tmp_path)
    assert (
        run.resume_checkpoint("auto") == str(checkpoints / "last.ckpt") == str(run.last_checkpoint)
    )
    assert run.resume_checkpoint("never") is None
    moved = [p for p in tmp_path.iterdir() if p.name.startswith("checkpoints-")]
    assert len(moved) == 1 and (moved[0] / "last.ckpt").is_file()  # nothing is lost
    assert not checkpoints.exists()


def test_resume_skips_a_damaged_last_checkpoint_for_the_newest_that_loads(tmp_path, caplog):
    run = RunDir(tmp_path)
    run.checkpoints.mkdir()
    for step in (2, 4):
        torch.save({"global_step": step}, run.checkpoints / f"step{step:08d}.ckpt")
        time.sleep(0.01)  # newest by modification time
    good = run.checkpoints / "step00000004.ckpt"
    torch.save({"global_step": 6}, run.last_checkpoint)
    run.last_checkpoint.write_bytes(run.last_checkpoint.read_bytes()[:100])  # a kill during a copy
    with caplog.at_level("INFO", logger="ldm_train.rundir"):
        assert run.resume_checkpoint("auto") == str(good)
    assert "skipped last.ckpt" in caplog.text
    run.last_checkpoint.write_bytes(b"")  # a full disk
    assert run.resume_checkpoint("auto") == str(good)
    run.last_checkpoint.unlink()  # deleted: the step files are still found
    assert run.resume_checkpoint("auto") == str(good)
    for path in run.checkpoints.iterdir():
        path.write_bytes(b"")
    with pytest.raises(UserError, match="no checkpoint in .* loads .*resume=never"):
        run.resume_checkpoint("auto")


def test_a_second_run_into_a_live_run_directory_is_refused(tmp_path, caplog):
    run = RunDir(tmp_path)
    second = pytest.raises(UserError, match="in use by another run .* delete")
    with run.lock(), second, run.lock():
        pass
    assert not (tmp_path / "run.lock").exists()  # released
    # A lock whose process is gone (kill -9) is taken over, with a message.
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / "run.lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    with caplog.at_level("WARNING", logger="ldm_train.rundir"), run.lock():
        assert f"lock of pid {dead.pid}" in caplog.text


def test_resuming_with_other_settings_lists_them_and_needs_force(make_cfg):
    cfg = make_cfg("stage=vae")
    run = RunDir(cfg.paths.run_dir)
    run.path.mkdir(parents=True)
    OmegaConf.save(cfg, run.config, resolve=True)
    run.check_same_run(make_cfg("stage=vae", "trainer.max_steps=100", "data.num_workers=1"), "auto")
    changed = make_cfg("stage=vae", "model.lr=0.5", "data.image_size=16")
    with pytest.raises(UserError) as error:
        run.check_same_run(changed, "auto")
    message = str(error.value)
    assert "model.lr: 0.002 -> 0.5" in message and "data.image_size: 32 -> 16" in message
    assert "resume=force" in message and "\n" not in message
    run.check_same_run(changed, "force")


def test_the_run_directory_layout_has_one_home(tmp_path):
    cfg = compose_config(["stage=unet", f"paths.output_root={tmp_path}", "experiment_name=x"])
    run = RunDir(cfg.paths.run_dir)
    assert run == RunDir.of_stage(tmp_path, "x", "unet")
    # The config spells the upstream exports with the resolver that asks RunDir.
    assert cfg.stage.vae == str(RunDir.of_stage(tmp_path, "x", "vae").export)
    assert cfg.stage.text_encoder == str(RunDir.of_stage(tmp_path, "x", "clip").export)
    assert RunDir.of_checkpoint(run.last_checkpoint) == RunDir(run.path.resolve())
    with pytest.raises(UserError, match=f"no checkpoint at {run.last_checkpoint}"):
        run.find_checkpoint()


def test_a_run_with_other_settings_takes_the_next_free_folder_and_says_why(make_cfg, caplog):
    """resume=auto: the folder of the same run (rerunning continues it), else the first free
    <stage>-N; a stage's newest export is what the next stage takes."""
    first = make_cfg("stage=vae")
    base = RunDir(first.paths.run_dir)
    assert base.path.name == "vae"
    base.path.mkdir(parents=True)
    base.save_config(first)
    assert make_cfg("stage=vae", "trainer.max_steps=100").paths.run_dir == str(base.path)
    other = make_cfg("stage=vae", "model.lr=0.5")
    second = RunDir(other.paths.run_dir)
    assert second.path == base.path.with_name("vae-2")
    second.path.mkdir()
    with caplog.at_level("INFO", logger="ldm_train.rundir"):
        second.save_config(other)
    assert f"{base.path} holds a run with other settings (model.lr: 0.002 -> 0.5)" in caplog.text
    assert make_cfg("stage=vae", "model.lr=0.5").paths.run_dir == str(second.path)
    assert make_cfg("stage=vae", "seed=3").paths.run_dir == str(base.path.with_name("vae-3"))
    for mode in ("force", "never"):  # the folder as named
        assert make_cfg("stage=vae", "model.lr=0.5", f"resume={mode}").paths.run_dir == str(
            base.path
        )
    # stage=unet takes the newest export of the experiment's vae runs.
    for run in (second, base):
        run.export.mkdir()
        (run.export / "config.json").write_text("{}")
        time.sleep(0.02)
    assert make_cfg("stage=unet").stage.vae == str(base.export)


def test_own_shards_name_their_experiment(tmp_path):
    def experiment(urls: str) -> str:
        return compose_config(["data=webdataset", f"data.train_urls='{urls}'"]).experiment_name

    assert experiment("data/photos/train-{000000..000009}.tar") == "photos"
    assert experiment("pipe:aws s3 cp s3://bucket/sets/cats/{000..099}.tar -") == "cats"
    cache = tmp_path / "outputs" / "photos" / "latents"
    cache.mkdir(parents=True)
    source = {"source_urls": ["data/photos/train-000000.tar"]}
    (cache / "cache.json").write_text(json.dumps(source))
    assert experiment(f"{cache}/train-{{000000..000003}}.tar") == "photos"  # the cache's source
