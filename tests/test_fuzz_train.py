"""The fuzz table of training (`python -m ldm_train`, issue 19): bad values are one-line errors of
the config check before anything is built (checked in this process: compose + validate), broken
files one-line errors of train() before a step runs, and a few of each through the real CLI (the
tests' warm fork server): exit code 2, one line, no traceback, nothing written outside the output
folder."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from fuzzing import (
    Payload,
    assert_written_only_under,
    broken_weights,
    deadline,
    pickled_folder,
    snapshot,
)

from ldm_train.errors import UserError
from ldm_train.train import train, validate

PIXEL_UNET = ("stage=unet", "stage.vae=null", "stage.text_encoder=null")

# overrides -> what the one line says
VALUES = {
    "data.batches_per_epoch=0": "data.batches_per_epoch=0 must be an integer >= 1",  # hung
    "model.lr=nan": "model.lr=nan must be a finite number > 0",  # passed the check before
    "model.lr=inf": "model.lr=inf must be a finite number > 0",
    "checkpoint_every_n_steps=-1": "checkpoint_every_n_steps=-1 must be an integer >= 1",
    "keep_last_checkpoints=-5": "keep_last_checkpoints=-5 must be an integer >= -1; -1: all",
    "max_nonfinite_steps=0": "max_nonfinite_steps=0 must be an integer >= 1",
    "trainer.devices=0": "trainer.devices=0 must be a count >= 1, -1 or auto",
    "trainer.devices='0,x'": "trainer.devices='0,x' must be a count",
    "trainer.precision=bogus": "trainer.precision='bogus' is not valid; choose one of:",
    "trainer.accelerator=abacus": "trainer.accelerator='abacus' is not valid; choose one of:",
    "optimizer=sgd optimizer.momentum=-1": "optimizer.momentum=-1 must be a finite number >= 0",
    "model.weight_decay=-1": "model.weight_decay=-1 must be a finite number >= 0",
    "stage=vae model.betas=[2,3]": "model.betas=[2, 3] must be a list of 2, each a finite",
    "model.betas=[0.9]": "model.betas=[0.9] must be a list of 2",
    "trainer.accumulate_grad_batches=0": "trainer.accumulate_grad_batches=0 must be an integer",
    "trainer.gradient_clip_val=-1": "trainer.gradient_clip_val=-1 must be a finite number >= 0",
    "trainer.log_every_n_steps=0": "trainer.log_every_n_steps=0 must be an integer >= 1",
    "trainer.limit_val_batches=-1": "trainer.limit_val_batches=-1 must be an integer >= 0 or",
    "trainer.max_steps=abc": "trainer.max_steps='abc' must be an integer >= -1; -1: none",
    "seed=abc": "seed='abc' must be an integer from 0 to 4294967295",
    "seed=-1": "seed=-1 must be an integer from 0 to 4294967295",
    f"seed={2**64}": f"seed={2**64} must be an integer",
    "data.shuffle_buffer=abc": "data.shuffle_buffer='abc' must be an integer >= 0",
    "data.batch_size=nan": "data.batch_size=nan must be an integer >= 1",
    "data.crop=diagonal": "data.crop='diagonal' is not valid; choose one of: center, random",
    "data.random_flip=maybe": "data.random_flip='maybe' must be true or false",
    "data.image_keys=[]": "data.image_keys=[] must be a string or a non-empty list",
    "stage=clip data.image_size=30": "data.image_size=30 does not divide into the CLIP image",
    "stage=vae data.image_size=30": "data.image_size=30 is not a multiple of 4",
    "experiment_name=../../escape": "experiment_name='../../escape' must be a name without '..'",
    # Options a schedule reads only once its warmup ends: checked up front.
    "lr_scheduler=polynomial lr_scheduler.power=abc": "lr_scheduler.power='abc' must be",
    "lr_scheduler=cosine_with_restarts lr_scheduler.num_cycles=0": "lr_scheduler.num_cycles=0",
    "lr_scheduler=polynomial model.warmup_steps=4": "lr_scheduler.warmup_steps=4 equals",
    " ".join((*PIXEL_UNET, "model.ema_decay=1.5")): "model.ema_decay=1.5 must be a finite number",
    " ".join((*PIXEL_UNET, "stage.module.conditioning.caption_dropout=2")): "caption_dropout=2",
    " ".join((*PIXEL_UNET, "stage.module.validation.sampling.guidance=nan")): "guidance=nan",
    " ".join((*PIXEL_UNET, "stage.module.validation.sampling.steps=5000")): "steps=5000 must",
    " ".join((*PIXEL_UNET, "model.prediction_type=x")): "model.prediction_type='x' is not valid",
    "data=webdataset data.train_urls=???": "data.train_urls is not set (???)",
}


@pytest.mark.parametrize("overrides", VALUES)
def test_a_bad_value_is_one_line_before_anything_is_built(overrides, make_cfg, tmp_path):
    before = snapshot(tmp_path)
    with deadline(), pytest.raises(UserError) as error:
        validate(make_cfg(*overrides.split()))
    message = str(error.value)
    assert VALUES[overrides] in message and "\n" not in message, message
    assert_written_only_under(tmp_path, before, tmp_path / "outputs")


@pytest.fixture(scope="module")
def broken(tmp_path_factory, upstream) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("broken_files")
    marker = root / "PAYLOAD_RAN"
    config_list = root / "config_list"
    config_list.mkdir()
    (config_list / "config.json").write_text(json.dumps([1, 2]))
    (root / "not_a_checkpoint.ckpt").write_text("hello")
    torch.save({"global_step": 3, "state_dict": {"net.encoder.conv_in.weight": torch.ones(1)}},
               root / "vae.ckpt")  # fmt: skip
    torch.save({"global_step": 3, "state_dict": Payload(marker)}, root / "payload.ckpt")
    return {
        **broken_weights(root / "weights"),
        "marker": marker,
        "config_list": config_list,
        "not_a_checkpoint": root / "not_a_checkpoint.ckpt",
        "vae_ckpt": root / "vae.ckpt",
        "payload_ckpt": root / "payload.ckpt",
        "pickled_vae": pickled_folder(upstream["vae"], root / "vae", "diffusion_pytorch_model.bin", marker),
        "pickled_clip": pickled_folder(upstream["clip"], root / "clip", "open_clip_pytorch_model.bin", marker),
    }  # fmt: skip


# overrides ({name}: a file of `broken`) -> what the one line says
FILES = {
    "stage=unet stage.vae={pickled_vae}": "no safetensors weights in",
    "stage=unet stage.vae=null stage.text_encoder={pickled_clip}": "not a state dict that loads",
    "stage=clip model.pretrained={empty}": "cannot load model.pretrained=",
    "stage=clip model.pretrained={list}": "holds a list, not a state dict of weights",
    "stage=clip model.pretrained={huge}": "cannot load model.pretrained=",
    "stage=clip model.pretrained={lying}": "cannot load model.pretrained=",
    "stage=vae model.pretrained={config_list}": "is not a model config (a JSON object)",
    "stage=vae model.pretrained={empty}": "is not a readable safetensors file",
    "ckpt_path={not_a_checkpoint}": "ckpt_path=",
    "ckpt_path={payload_ckpt}": "ckpt_path=",
    "stage=clip ckpt_path={vae_ckpt}": "a stage=vae checkpoint, and this run is stage=clip",
    "logger=tensorboard": "needs a package that is not installed",
}


@pytest.mark.parametrize("overrides", FILES)
def test_a_broken_file_is_one_line_before_a_step(overrides, broken, make_cfg, tmp_path):
    if "tensorboard" in overrides and has_tensorboard():
        pytest.skip("tensorboard is installed here")
    before = snapshot(tmp_path)
    cfg = make_cfg(*overrides.format(**broken).split(), "trainer.max_steps=1")
    with deadline(), pytest.raises(UserError) as error:
        train(cfg)
    message = str(error.value)
    assert FILES[overrides] in message and "\n" not in message, message
    assert_written_only_under(tmp_path, before, tmp_path / "outputs")
    assert not broken["marker"].exists()


def has_tensorboard() -> bool:
    import importlib.util

    return any(importlib.util.find_spec(m) for m in ("tensorboard", "tensorboardX"))


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["data.batches_per_epoch=0"], "data.batches_per_epoch=0 must be an integer >= 1"),
        (["logger=tensorboard"], "needs a package that is not installed"),
        (["stage=unet", "stage.vae={pickled_vae}"], "pickles, not loaded"),
        (["model=clip/huge"], "model=clip/huge: no such model"),
    ],
)
def test_the_cli_prints_one_line_and_exits_2(
    extra, expected, broken, tiny_overrides, tmp_path, run_cli
):
    if "logger=tensorboard" in extra and has_tensorboard():
        pytest.skip("tensorboard is installed here")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    before = snapshot(tmp_path)
    args = [*tiny_overrides(tmp_path / "outputs"), *(e.format(**broken) for e in extra)]
    result = run_cli(["-m", "ldm_train", *args], cwd, check=False, timeout=120)
    lines = [line for line in result.stderr.splitlines() if re.search(r"error", line, re.I)]
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("ldm_train: error: "), result.stderr[-3000:]
    assert expected in lines[0] and "Traceback" not in result.stderr
    assert_written_only_under(tmp_path, before, tmp_path / "outputs")
    assert not broken["marker"].exists()
