"""Nothing of the user's is destroyed: outputs are written beside their target and renamed into
place (ldm_train.atomic), so a write that fails midway (a full disk) leaves the previous file; a
folder of the user's files is refused, never overwritten; another stage's checkpoint is refused in
one line naming both stages."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf, open_dict

import ldm_train.callbacks.checkpoint as checkpoint_module
from ldm_train.atomic import MARKER, write_folder, written_beside
from ldm_train.callbacks.checkpoint import AtomicCheckpointIO
from ldm_train.checkpoints import STAGE_KEY
from ldm_train.errors import UserError
from ldm_train.export import export_checkpoint
from ldm_train.export import main as export_main
from ldm_train.rundir import RunDir
from ldm_train.train import train


def full_disk_after(limit: int):
    """A torch.save that writes `limit` bytes of the file, then fails as a full disk does."""

    def save(obj, path) -> None:
        with open(path, "wb") as file:
            file.write(b"\0" * limit)
        raise OSError(errno.ENOSPC, "No space left on device")

    return save


def test_a_full_disk_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    io, path = AtomicCheckpointIO(), tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"global_step": 1, "w": torch.ones(3)}, path)
    monkeypatch.setattr(checkpoint_module.torch, "save", full_disk_after(100))
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint({"global_step": 2, "w": torch.zeros(3)}, path)
    assert torch.load(path, weights_only=True)["global_step"] == 1
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]  # no temporary file left


def test_a_run_whose_disk_fills_keeps_its_last_good_checkpoint(make_cfg, monkeypatch):
    """Through train(): a checkpoint and last.ckpt every step, the disk full from step 3 on."""
    saves = []
    real_save = torch.save

    def save(obj, path) -> None:
        saves.append(path)
        (real_save if len(saves) <= 4 else full_disk_after(1000))(obj, path)

    monkeypatch.setattr(checkpoint_module.torch, "save", save)
    cfg = make_cfg("trainer.max_steps=5", "checkpoint_every_n_steps=1", "logger=none")
    with open_dict(cfg):
        cfg.stage.module = OmegaConf.create({"_target_": "test_resume.Recorder"})
    with pytest.raises(OSError, match="No space left"):
        train(cfg)
    checkpoints = RunDir(cfg.paths.run_dir).checkpoints
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"] == 2
    assert not [p for p in checkpoints.iterdir() if p.name.startswith(".")]


def test_a_failed_folder_write_leaves_the_earlier_one(tmp_path):
    target = tmp_path / "export"
    write_folder(target, lambda folder: (folder / "a.txt").write_text("first"), "test")
    with pytest.raises(RuntimeError), written_beside(target) as temporary:
        temporary.mkdir()
        (temporary / "a.txt").write_text("half")
        raise RuntimeError("killed midway")
    assert (target / "a.txt").read_text() == "first" and (target / MARKER).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def user_folder(root: Path) -> dict[Path, bytes]:
    """A folder of the user's, with files where an export writes its parts."""
    files = {
        root / "vae" / "notes.txt": b"mine",
        root / "unet" / "model.bin": b"also mine",
        root / "photo.png": b"\x89PNG",
    }
    for path, content in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    return files


def test_export_into_a_folder_of_the_users_keeps_every_file(trained, tmp_path, capsys):
    run = RunDir(trained[1].parent)
    files = user_folder(tmp_path / "userdir")
    assert export_main([str(run.path), "--out", str(tmp_path / "userdir")]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert "holds files ldm_train did not write" in line
    assert {path: path.read_bytes() for path in files} == files
    assert sorted(p.name for p in (tmp_path / "userdir").iterdir()) == ["photo.png", "unet", "vae"]
    # A new folder is written; the same command again replaces what it wrote there.
    for _ in range(2):
        assert export_main([str(run.path), "--out", str(tmp_path / "new")]) == 0
    assert (tmp_path / "new" / MARKER).is_file() and (tmp_path / "new" / "unet").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "userdir"]  # nothing left over


def test_checkpoints_record_their_stage(trained):
    last = RunDir(trained[1].parent).last_checkpoint
    assert torch.load(last, weights_only=True, mmap=True)[STAGE_KEY] == "unet"


def test_another_stages_checkpoint_is_refused_naming_both(trained, tmp_path):
    unet_run = RunDir(trained[1].parent)
    vae_run = RunDir(tmp_path / "vae")
    vae_run.checkpoints.mkdir(parents=True)
    shutil.copy(unet_run.last_checkpoint, vae_run.last_checkpoint)
    message = "a stage=unet checkpoint, and this run is stage=vae"
    with pytest.raises(UserError, match=message):
        vae_run.resume_checkpoint("auto", stage="vae")
    with pytest.raises(UserError, match=f"ckpt_path=.*: {message}"):
        vae_run.resume_checkpoint("auto", str(unet_run.last_checkpoint), stage="vae")
    # One written before checkpoints recorded their stage: its weights tell it.
    copy = shutil.copytree(unet_run.path, tmp_path / "unet")
    torch.save(
        {"global_step": 1, "state_dict": {"net.encoder.conv_in.weight": torch.ones(1)}},
        copy / "checkpoints" / "last.ckpt",
    )
    with pytest.raises(UserError, match="is a stage=vae checkpoint, but .* is a stage=unet run"):
        export_checkpoint(copy)
