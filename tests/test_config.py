"""The config tree composes for every stage, presets follow the data, bad options are one-line errors."""

from __future__ import annotations

import pytest
from hydra.errors import MissingConfigException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ldm_train.config import UserError, check_overrides, compose_config, config_dir
from ldm_train.data.datamodule import WebDataModule, expand_urls
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
    with pytest.raises(UserError, match="resume='sometimes'.*auto, never"):
        validate(compose_config(["resume=sometimes"]))


def test_missing_ckpt_path_names_the_path(tmp_path):
    cfg = compose_config([f"ckpt_path={tmp_path}/nope.ckpt"])
    with pytest.raises(UserError, match=f"{tmp_path}/nope.ckpt does not exist"):
        RunDir(tmp_path).resume_checkpoint(cfg.resume, cfg.ckpt_path)


def test_resume_auto_finds_last_and_never_keeps_old_checkpoints(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    (checkpoints / "last.ckpt").write_bytes(b"x")
    run = RunDir(tmp_path)
    assert (
        run.resume_checkpoint("auto") == str(checkpoints / "last.ckpt") == str(run.last_checkpoint)
    )
    assert run.resume_checkpoint("never") is None
    moved = [p for p in tmp_path.iterdir() if p.name.startswith("checkpoints-")]
    assert len(moved) == 1 and (moved[0] / "last.ckpt").is_file()  # nothing is lost
    assert not checkpoints.exists()


def test_unknown_override_lists_the_valid_keys_at_its_level():
    with pytest.raises(
        UserError, match=r"model\.kl_wieght \(did you mean model\.kl_weight\?\).*lr"
    ):
        check_overrides(["stage=vae", "model.kl_wieght=1"])
    with pytest.raises(UserError, match=r"seeed \(did you mean seed\?\).*\+seeed="):
        check_overrides(["seeed=3"])


def test_valid_overrides_pass_the_check():
    check_overrides(
        ["stage=vae", "model.kl_weight=1", "data.image_size=64", "+trainer.profiler=simple"]
    )
    check_overrides(["stage=vae,clip", "model.lr=1e-3,3e-4"])  # sweeps: Hydra checks each job
    check_overrides(["experiment=shapes_64", "trainer.max_steps=3", "--cfg", "job"])


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
