"""The real CLI end to end (subprocesses): a fresh directory, the default dataset made on first use,
W&B offline without a prompt, one-line errors, a 2-job multirun, and an installed wheel."""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
QUICK = [
    "trainer.max_steps=2",
    "data.batches_per_epoch=2",
    "trainer.limit_val_batches=1",
    "trainer.enable_progress_bar=false",
    "data.num_workers=0",
    "data.batch_size=8",
    # A smaller embedded dataset than the default, made the same way.
    "data.make_dataset.n_train=512",
    "data.make_dataset.n_val=64",
]


LIBRARY_WARNING = re.compile(r"Warning\b|warnings\.warn|^\s*warn", re.IGNORECASE | re.MULTILINE)


def test_fresh_directory_makes_data_trains_and_logs_offline(tmp_path, run_cli):
    # No W&B credentials, no WANDB_MODE, no stdin: must run offline without asking anything.
    # The console of a default run (progress bar on): the step counter against max_steps, no
    # epoch counter of an endless stream, no model-summary table, no library warning.
    quick = [o for o in QUICK if o != "trainer.enable_progress_bar=false"]
    result = run_cli(["-m", "ldm_train", "stage=vae", *quick], tmp_path, HOME=str(tmp_path))
    console = result.stdout + result.stderr
    run_dir = tmp_path / "outputs" / "shapes" / "vae"
    assert f"outputs in {run_dir}" in console
    assert "vae  step 2/2" in console and "validation at step 2: " in console
    assert "parameters: " in console and "trainable" in console
    for noise in ("Epoch", "/-2", "v_num", "FLOPs", "TPU available", "fit` stopped"):
        assert noise not in console, noise
    assert not LIBRARY_WARNING.search(console), LIBRARY_WARNING.search(console)
    assert (tmp_path / "data" / "shapes-32" / "train-000015.tar").is_file()
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / "config.yaml").is_file()
    assert list((run_dir / "wandb").glob("offline-run-*"))


def test_unknown_stage_lists_valid_stages(tmp_path, run_cli):
    result = run_cli(["-m", "ldm_train", "stage=difusion"], tmp_path, check=False)
    assert result.returncode != 0
    assert all(stage in result.stderr for stage in ("clip", "unet", "vae"))


def test_user_error_is_one_line_with_exit_code_2(tmp_path, run_cli):
    result = run_cli(["-m", "ldm_train", "resume=sometimes", "logger=none"], tmp_path, check=False)
    assert result.returncode == 2
    assert "resume='sometimes' is not valid; choose one of: auto, force, never" in result.stderr
    assert "Traceback" not in result.stderr


def test_multirun_gives_each_job_its_own_resumable_directory(tmp_path, run_cli):
    args = ["-m", "ldm_train", "-m", "stage=vae", "model.lr=0.001,0.0003", "logger=csv", *QUICK]
    run_cli(args, tmp_path)
    sweep = tmp_path / "outputs" / "shapes" / "vae-multirun"
    # Each job's folder is named after its overrides, so rerunning the sweep finds it again.
    jobs = [p.name for p in sweep.iterdir() if (p / "checkpoints" / "last.ckpt").is_file()]
    assert len(jobs) == 2
    assert sorted("model.lr=0.0003" in job for job in jobs) == [False, True]


def test_installed_wheel_finds_its_config(tmp_path, run_cli):
    run_cli(
        [
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(REPO),
        ],
        tmp_path,
    )
    wheel = next((tmp_path / "dist").glob("ldm_train-*.whl"))
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    code = (
        "from ldm_train.config import config_dir, compose_config; "
        "print(config_dir()); print(compose_config(['stage=unet']).stage.name)"
    )
    result = run_cli(["-c", code], tmp_path, PYTHONPATH=str(tmp_path / "site"))
    where, stage = result.stdout.split()
    assert Path(where) == tmp_path / "site" / "ldm_train" / "conf" and stage == "unet"
