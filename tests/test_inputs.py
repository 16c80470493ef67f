"""No input hangs or crashes a run: bad config values are one-line errors before anything runs,
the CLI prints them (and the loader's) as one line with exit code 2, and a default run's console
holds no library warning a user cannot act on."""

from __future__ import annotations

import json
import logging
import re
import warnings
from pathlib import Path

import pytest
import torch
import webdataset as wds

from ldm_train import quiet
from ldm_train.checks import device_count
from ldm_train.config import check_overrides
from ldm_train.errors import UserError
from ldm_train.train import validate

# ---------------------------------------------------------------- values checked before a run

BAD_VALUES = {
    # override(s) -> what the one line must say
    "data.batch_size=0": "data.batch_size=0 must be an integer >= 1",  # hung forever before
    "data.batch_size=2.5": "data.batch_size=2.5 must be an integer >= 1",
    "data.batch_size=nan": "data.batch_size=nan must be an integer >= 1",
    "data.val_batch_size=0": "data.val_batch_size=0 must be an integer >= 1",
    "data.image_size=0": "data.image_size=0 must be an integer from 1 to 16384",
    "data.num_workers=-1": "data.num_workers=-1 must be an integer >= 0",
    "trainer.max_steps=abc": "trainer.max_steps='abc' must be an integer >= -1; -1: none",
    "model.lr=-1": "model.lr=-1 must be a finite number > 0",
    "model.lr=0": "model.lr=0 must be a finite number > 0",
    "stage=vae data.image_size=30": (
        "data.image_size=30 is not a multiple of 4, the downsampling factor of the VAE preset "
        "(tiny): use e.g. data.image_size=32"
    ),
    "stage=vae model=vae/sd data.image_size=36": "is not a multiple of 8",
    "trainer.accelerator=cpu trainer.devices=999": "trainer.devices=999 asks for more than the",
}


@pytest.mark.parametrize("overrides", BAD_VALUES)
def test_bad_value_is_a_one_line_user_error(make_cfg, overrides):
    with pytest.raises(UserError) as error:
        validate(make_cfg(*overrides.split()))
    assert BAD_VALUES[overrides] in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize(
    "overrides",
    ["", "stage=vae", "stage=vae data.image_size=64", "trainer.max_steps=-1", "trainer.devices=1"],
)
def test_good_values_pass(make_cfg, overrides):
    validate(make_cfg(*overrides.split()))


def test_unet_image_size_against_the_vae_on_disk(make_cfg, tmp_path):
    """stage=unet reads the VAE's factor from its config.json (nothing else of the folder)."""
    vae = tmp_path / "vae"
    vae.mkdir()
    (vae / "config.json").write_text(json.dumps({"block_out_channels": [8, 8, 8, 8]}))
    with pytest.raises(
        UserError, match=f"not a multiple of 8, the downsampling factor of the VAE at {vae}"
    ):
        validate(make_cfg("stage=unet", f"stage.vae={vae}", "data.image_size=36"))
    validate(make_cfg("stage=unet", f"stage.vae={vae}", "data.image_size=40"))
    validate(make_cfg("stage=unet", "stage.vae=null", "data.image_size=36"))  # pixel space


@pytest.mark.parametrize(
    "accelerator, devices, visible, message",
    [
        ("gpu", 4, 1, "trainer.devices=4 asks for more than the 1 GPU(s) visible"),
        ("gpu", "0,3", 2, "trainer.devices=0,3 asks for more than the 2 GPU(s) visible"),
        ("auto", 2, 1, "trainer.devices=2 asks for more than the 1 GPU(s) visible"),
        ("gpu", 1, 0, "trainer.accelerator=gpu but no GPU is visible"),
    ],
)
def test_more_gpus_than_visible(make_cfg, monkeypatch, accelerator, devices, visible, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: visible > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    cfg = make_cfg(f"trainer.accelerator={accelerator}", f"trainer.devices='{devices}'")
    with pytest.raises(UserError, match=re.escape(message)):
        validate(cfg)


@pytest.mark.parametrize(
    "devices, count",
    [(1, 1), ("2", 2), ("auto", None), (-1, None), ("-1", None), ([0, 3], 4), ("0,1", 2)],
)
def test_device_count(devices, count):
    assert device_count(devices) == count


def test_unknown_preset_lists_the_presets_next_to_it():
    with pytest.raises(UserError) as error:
        check_overrides(["stage=vae", "model=vae/huge"])
    assert str(error.value) == "model=vae/huge: no such model; choose one of: vae/sd, vae/tiny"


# ---------------------------------------------------------------- the CLI: one line, exit code 2


def tiny_run(tiny_overrides, tmp_path: Path, *extra: str) -> list[str]:
    return [
        "-m",
        "ldm_train",
        *tiny_overrides(tmp_path / "outputs"),
        "data.batches_per_epoch=2",
        "trainer.max_steps=2",
        "trainer.limit_val_batches=1",
        *extra,
    ]


def bad_shards(tmp_path: Path) -> str:
    """Two shards of undecodable images: every training sample is bad."""
    for i in range(2):
        with wds.TarWriter(str(tmp_path / f"bad-{i}.tar")) as writer:
            for j in range(4):
                writer.write({"__key__": f"k{i}{j}", "jpg": b"not an image", "txt": b"x"})
    return f"{tmp_path}/bad-{{0..1}}.tar"


@pytest.mark.slow
@pytest.mark.parametrize(
    "case", ["batch size 0", "max_steps abc", "unknown preset", "missing file url", "all bad"]
)
def test_cli_prints_one_line_and_exits_2(tiny_overrides, tmp_path, case, run_cli):
    extra = {
        "batch size 0": ["data.batch_size=0"],
        "max_steps abc": ["trainer.max_steps=abc"],
        "unknown preset": ["stage=vae", "model=vae/huge"],
        "missing file url": [f"data.train_urls=file://{tmp_path}/nowhere.tar"],
        # In a DataLoader worker: torch wraps the error with the worker's traceback.
        "all bad": [f"data.train_urls='{bad_shards(tmp_path)}'", "data.num_workers=2"],
    }[case]
    result = run_cli(tiny_run(tiny_overrides, tmp_path, *extra), tmp_path, check=False)
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(errors) == 1 and errors[0].startswith("ldm_train: error: "), result.stderr[-3000:]
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------------- warnings a user cannot act on

NOISE = [
    "'set_vital' is deprecated",
    "LeafSpec",
    "flops_per_batch",
    "exists and is not empty",
    "callbacks used to create the checkpoint need to be provided",
    "💡 Tip",
    "Cannot initialize model with low cpu memory usage",
    "The anonymous setting has no effect",
]


@pytest.mark.slow
def test_default_runs_print_no_library_noise(tiny_overrides, tmp_path, run_cli):
    """clip, a resume of it with another checkpoint cadence, vae, and unet on their exports: the
    runs succeed and stderr holds none of the filtered notes."""
    runs = [
        ["debug=fast", "logger=wandb"],  # offline
        ["debug=fast", "trainer.max_steps=4", "checkpoint_every_n_steps=3"],  # resumes
        ["debug=fast", "stage=vae"],
        ["debug=fast", "stage=unet"],  # loads the vae and clip exports
    ]
    for i, extra in enumerate(runs):
        # The first in a fresh interpreter, for the notes printed while importing; the others
        # fork from the tests' warm server (conftest run_cli).
        first = {"fresh": True, "WANDB_MODE": "offline"} if i == 0 else {}
        result = run_cli(tiny_run(tiny_overrides, tmp_path, *extra), tmp_path, **first)
        shown = [noise for noise in NOISE if noise in result.stderr]
        assert not shown, result.stderr[-3000:]


def test_filters_drop_only_their_message():
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet.install()
        warnings.warn("Checkpoint directory /x exists and is not empty.", stacklevel=1)
        warnings.warn(
            "Be aware that when using `ckpt_path`, callbacks used to create the checkpoint need "
            "to be provided during `Trainer` instantiation. Please add the following callbacks: "
            "[\"StepCheckpoint{'monitor': 'step', 'every_n_train_steps': 5}\"].",
            stacklevel=1,
        )
        kept = (
            "Be aware that when using `ckpt_path`, callbacks used to create the checkpoint need "
            "to be provided during `Trainer` instantiation. Please add the following callbacks: "
            "['EMAWeightAveraging']."
        )
        warnings.warn(kept, stacklevel=1)
        warnings.warn("The loss is NaN", stacklevel=1)
    assert [str(w.message) for w in seen] == [kept, "The loss is NaN"]


def test_wandb_note_hidden(make_cfg, capsys, monkeypatch):
    from wandb.errors import term

    # As in a fresh process: an earlier wandb run in this one (WANDB_SILENT) leaves term silent.
    monkeypatch.setattr(term, "_silent", False)
    monkeypatch.setattr(term, "_show_warnings", True)
    monkeypatch.setattr(term, "_printed_messages", set())
    note = "The anonymous setting has no effect and will be removed in a future version."
    quiet.install(make_cfg("logger=wandb"))
    term.termwarn(note, repeat=False)
    term.termwarn("a note that stays", repeat=False)
    err = capsys.readouterr().err
    assert "anonymous" not in err and "a note that stays" in err


def test_log_notes_dropped_others_kept(caplog):
    quiet.install()
    with caplog.at_level(logging.INFO):
        logging.getLogger("lightning.pytorch.utilities.rank_zero").info("💡 Tip: install x")
        logging.getLogger("lightning.pytorch.utilities.rank_zero").info("GPU available: False")
    assert "Tip" not in caplog.text and "GPU available" in caplog.text
