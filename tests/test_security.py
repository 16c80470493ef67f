"""Loading never executes code from a file: for each malicious file a user could be handed (a
checkpoint, a run folder's config, a text encoder folder, an export index), nothing runs and the
error is one line."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ldm_train.diffusion.pipeline import Pipeline
from ldm_train.diffusion.text_encoder import load_text_encoder
from ldm_train.errors import UserError
from ldm_train.export import export_checkpoint
from ldm_train.formats.clip_model import CONFIG_FILE
from ldm_train.formats.transformers_clip import (
    clip_tokenizer,
    save_text_encoder,
    to_clip_text_model,
)
from ldm_train.rundir import RunDir
from ldm_train.safety import check_targets


class Payload:
    """Unpickling it would create `marker` (as a real payload would run anything)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory, tiny_overrides) -> RunDir:
    """A real (2-step) stage=vae run: its config.yaml and checkpoints to tamper with."""
    from ldm_train.config import compose_config
    from ldm_train.train import train

    out = tmp_path_factory.mktemp("vae_run") / "outputs"
    cfg = compose_config([*tiny_overrides(out), "stage=vae", "trainer.max_steps=2", "logger=none"])
    _, objects = train(cfg)
    return RunDir(objects["run_dir"])


def copy_run(run: RunDir, to: Path) -> RunDir:
    shutil.copytree(run.path, to)
    return RunDir(to)


def test_a_pickled_payload_in_a_checkpoint_does_not_run_on_export(vae_run, tmp_path):
    run = copy_run(vae_run, tmp_path / "run")
    marker = tmp_path / "ran"
    with run.last_checkpoint.open("wb") as f:
        pickle.dump({"state_dict": Payload(marker)}, f)
    with pytest.raises(UserError) as error:
        export_checkpoint(run.path)
    assert "without running code" in one_line(error) and not marker.exists()


def test_a_target_that_runs_code_in_a_run_config_is_refused(vae_run, tmp_path):
    run = copy_run(vae_run, tmp_path / "run")
    marker = tmp_path / "ran"
    payload = tmp_path / "payload.pkl"
    payload.write_bytes(pickle.dumps(Payload(marker)))
    cfg = OmegaConf.load(run.config)
    cfg.stage.module.loss.discriminator = {
        "_target_": "torch.load",
        "f": str(payload),
        "weights_only": False,
    }
    OmegaConf.save(cfg, run.config)
    with pytest.raises(UserError) as error:
        export_checkpoint(run.path)
    assert "stage.module.loss.discriminator" in one_line(error) and "'torch.load'" in str(
        error.value
    )
    assert not marker.exists()
    # A module from the current directory is never even imported; builtins and os are refused.
    for name in ("evil.run", "os.system", "builtins.eval", "subprocess.run", "torch.hub.load"):
        with pytest.raises(UserError):
            check_targets({"x": {"_target_": name}}, "config.yaml")
    with pytest.raises(UserError, match="'evil.fn'"):  # get_method's path is a target too
        check_targets({"_target_": "hydra.utils.get_method", "path": "evil.fn"}, "config.yaml")
    # The config's own targets pass, and a user can trust a name explicitly.
    check_targets(OmegaConf.load(vae_run.config), vae_run.config)
    check_targets({"_target_": "evil.fn"}, "config.yaml", allow=["evil."])


def test_a_clip_folder_asking_for_a_remote_code_tokenizer_is_refused(upstream, tmp_path):
    folder = shutil.copytree(upstream["clip"], tmp_path / "clip")
    config = json.loads((folder / CONFIG_FILE).read_text())
    config["model_cfg"]["text_cfg"] |= {
        "hf_tokenizer_name": str(tmp_path / "evil_tokenizer"),
        "tokenizer_kwargs": {"trust_remote_code": True},
    }
    (folder / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(UserError) as error:
        load_text_encoder(folder)
    assert "hf_tokenizer_name" in one_line(error)


def test_a_tokenizer_auto_map_never_runs(make_open_clip, tmp_path):
    model, _ = make_open_clip()
    save_text_encoder(to_clip_text_model(model), clip_tokenizer(model.context_length), tmp_path)
    marker = tmp_path / "ran"
    (tmp_path / "tokenizer" / "tokenization_evil.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
        "from transformers import CLIPTokenizer as EvilTokenizer\n"
    )
    config_file = tmp_path / "tokenizer" / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
    config_file.write_text(json.dumps(config))
    encoder = load_text_encoder(tmp_path)  # a pipeline-style folder: text_encoder/ + tokenizer/
    assert encoder([""])[0].shape[0] == 1 and not marker.exists()


def test_export_index_paths_stay_inside_the_export(trained, tmp_path):
    export = shutil.copytree(trained[1], tmp_path / "export")
    (tmp_path / "elsewhere").mkdir()
    index_file = next(p for p in export.glob("*.json") if p.name == "ldm_train_pipeline.json")
    index = json.loads(index_file.read_text())
    index["unet"] = "../elsewhere"
    index_file.write_text(json.dumps(index))
    with pytest.raises(UserError) as error:
        Pipeline.load(export)
    assert "not a folder inside the export folder" in one_line(error)
