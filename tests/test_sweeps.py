"""Sweeps: the example grid composes into its jobs, the SLURM launcher config extends the submitit
plugin's, a multirun's W&B runs share a group, and the example sweep runs through the real CLI."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import open_dict

from ldm_train.config import check_overrides, compose_config
from ldm_train.errors import UserError
from ldm_train.train import build_logger


def test_example_sweep_is_a_grid_over_lr_and_prediction_type():
    cfg = compose_config(["experiment=unet_sweep"], return_hydra_config=True)
    assert cfg.stage.name == "unet"
    params = cfg.hydra.sweeper.params
    assert params["model.lr"] == "1e-4,3e-4,1e-3"
    assert params["model.prediction_type"] == "epsilon,v_prediction"
    # One job of the grid: the values reach the optimizer and the noise scheduler.
    job = compose_config(
        ["experiment=unet_sweep", "model.lr=3e-4", "model.prediction_type=epsilon"]
    )
    assert job.optimizer.lr == 3e-4
    assert job.stage.module.noise_scheduler.prediction_type == "epsilon"


def test_slurm_launcher_extends_the_submitit_plugin():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install -e '.[slurm]'")
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher

    cfg = compose_config(["hydra/launcher=slurm"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher.gpus_per_node == launcher.tasks_per_node == 8
    assert launcher.max_num_timeout > 0 and launcher.signal_delay_s > 0  # requeued, resumes
    assert "array_parallelism" in launcher  # the plugin's own keys come along
    assert isinstance(instantiate(launcher), SlurmLauncher)


@pytest.fixture
def multirun_job(make_cfg):
    """The config of job 1 of a multirun, as Hydra sets it up inside that job."""
    cfg = make_cfg("stage=vae", "logger=wandb", "logger.offline=true", "model.lr=0.003")
    hydra_cfg = compose_config(["stage=vae"], return_hydra_config=True).hydra
    with open_dict(hydra_cfg):
        hydra_cfg.mode = RunMode.MULTIRUN
        hydra_cfg.job.num = 1
        hydra_cfg.job.override_dirname = "model.lr=0.003"
        hydra_cfg.sweep.dir = "outputs/shapes/vae-multirun"
    with open_dict(cfg):
        cfg.hydra = hydra_cfg
    HydraConfig.instance().set_config(cfg)
    Path(cfg.paths.run_dir).mkdir(parents=True)
    yield cfg
    HydraConfig.instance().cfg = None


def test_multirun_jobs_share_a_wandb_group(multirun_job):
    logger = build_logger(multirun_job)
    init = logger._wandb_init  # what WandbLogger passes to wandb.init
    assert init["group"] == "shapes-vae-multirun"
    assert init["name"] == "shapes-vae[model.lr=0.003]"
    assert init["job_type"] == "vae"


def test_single_run_group_is_the_experiment(make_cfg):
    cfg = make_cfg("stage=vae", "logger=wandb", "logger.offline=true")
    Path(cfg.paths.run_dir).mkdir(parents=True)
    init = build_logger(cfg)._wandb_init
    assert init["group"] == "shapes" and init["name"] == "shapes-vae"


@pytest.mark.slow
def test_example_sweep_runs_two_jobs_in_one_wandb_group(tmp_path, tiny_overrides, run_cli):
    args = [
        "-m",
        "ldm_train",
        "-m",
        "experiment=unet_sweep",
        "model.lr=0.001",  # replaces the grid's 3 values: 1 x 2 jobs
        "stage.vae=null",  # pixel space, unconditional: no upstream exports needed
        "stage.text_encoder=null",
        "stage.module.validation.samples_per_prompt=0",
        "data.image_size=16",
        *tiny_overrides(tmp_path / "outputs"),
        "logger=wandb",
        "data.batches_per_epoch=2",
        "trainer.max_steps=2",
        "trainer.limit_val_batches=1",
    ]
    run_cli(args, tmp_path, HOME=str(tmp_path))  # no W&B login: offline
    sweep = tmp_path / "outputs" / "shapes" / "unet-multirun"
    # Each job's folder is named after its overrides (the shard paths make it nest).
    jobs = sorted(p.parent.parent for p in sweep.rglob("checkpoints/last.ckpt"))
    assert len(jobs) == 2
    assert ["prediction_type=epsilon" in str(job) for job in jobs] == [True, False]
    assert all("model.lr=0.001" in str(job) for job in jobs)
    for job in jobs:  # the offline run's record holds the group it will be synced into
        (record,) = job.glob("wandb/offline-run-*/run-*.wandb")
        assert b"shapes-unet-multirun" in record.read_bytes()


def test_slurm_launcher_without_its_extra_is_a_one_line_error(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name.startswith("hydra_plugins") else real_find_spec(name, *a),
    )
    with pytest.raises(
        UserError, match=r"hydra/launcher=slurm needs an optional extra: pip install"
    ):
        check_overrides(["-m", "hydra/launcher=slurm", "model.lr=1e-4,3e-4"])
