"""Loading never executes code from a file: for each malicious file a user could be handed (a
checkpoint, a run folder's config, a text encoder folder, an export index), nothing runs and the
error is one line."""

from __future__ import annotations

import json
import pickle
import re
import shutil
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ldm_train.diffusion.pipeline import Pipeline
from ldm_train.diffusion.text_encoder import load_text_encoder
from ldm_train.errors import UserError
from ldm_train.evaluate import main as evaluate_main
from ldm_train.export import export_checkpoint
from ldm_train.export import main as export_main
from ldm_train.formats.clip_model import CONFIG_FILE
from ldm_train.formats.transformers_clip import (
    clip_tokenizer,
    save_text_encoder,
    to_clip_text_model,
)
from ldm_train.rundir import RunDir
from ldm_train.safety import Trusted, check_node, rebuild


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
    # A module from the current directory is never even imported; builtins, os and our own
    # functions that are no part of a stage are refused.
    for name in (
        "evil.run",
        "os.system",
        "builtins.eval",
        "subprocess.run",
        "torch.hub.load",
        "torchmetrics.image.fid.FrechetInceptionDistance",  # a library class that reads a file
        "ldm_train.metrics.reference.read_validation",
        "ldm_train.export.export_checkpoint",
        "hydra.utils.get_method",
    ):
        with pytest.raises(UserError, match="not one of the parts a stage is built from"):
            check_node({"x": {"_target_": name}}, "<root>", "config.yaml", Trusted())
    # The config's own parts pass (each replaced by the registered callable), and the user can
    # trust a name on the command line.
    module = OmegaConf.to_container(OmegaConf.load(vae_run.config).stage.module, resolve=True)
    assert callable(check_node(module, "stage.module", "config.yaml", Trusted())["_target_"])
    trusted = Trusted(("collections.",))
    check_node({"_target_": "collections.OrderedDict"}, "<root>", "config.yaml", trusted)


def presets() -> list[list[str]]:
    """Every stage with each of its model presets (conf/model/<stage>/), and LoRA."""
    conf = Path(__file__).resolve().parents[1] / "conf" / "model"
    runs = [
        [f"stage={stage}", f"model={stage}/{preset.stem}"]
        for stage in ("clip", "vae", "unet")
        for preset in sorted((conf / stage).glob("*.yaml"))
    ]
    return [*runs, ["stage=unet", "adapter=lora"], ["stage=unet", "experiment=lora"]]


@pytest.mark.parametrize("overrides", presets(), ids=" ".join)
def test_every_preset_rebuilds_from_the_registry(overrides):
    """What export rebuilds (stage.module of a run's config.yaml) names registered parts only, for
    every preset: a part missing from safety.PARTS would make the run's own export refuse it."""
    from ldm_train.config import compose_config

    module = compose_config(overrides).stage.module
    plain = OmegaConf.to_container(module, resolve=True)
    assert callable(check_node(plain, "stage.module", "config.yaml", Trusted())["_target_"])


def test_a_registered_part_takes_only_its_own_fields_and_plain_values():
    vae = {"_target_": "ldm_train.formats.vae_folder.load_vae", "path": None}
    check_node(vae, "x", "config.yaml", Trusted())
    for bad, message in [
        (
            {**vae, "shell": "x"},
            "x.shell is not a parameter of ldm_train.formats.vae_folder.load_vae",
        ),
        ({**vae, "path": "pipe:touch /tmp/x"}, "x.path='pipe:touch /tmp/x' is a pipe: URL"),
        ({**vae, "path": "https://example.com/v"}, "is a https: URL, which would run a program"),
    ]:
        with pytest.raises(UserError, match=re.escape(message)):
            check_node(bad, "x", "config.yaml", Trusted())


def test_a_run_folder_naming_our_own_functions_runs_no_shell_command(trained, tmp_path, capsys):
    """The first reproduction of issue 19: a handed unet run folder whose stage.module reads
    "validation shards" through a pipe: URL, under export and under evaluate."""
    run = copy_run(RunDir(trained[1].parent), tmp_path / "run")
    marker = tmp_path / "MARK"
    good = next(
        Path(str(OmegaConf.load(run.config).data.val_urls).split("{")[0]).parent.glob("*.tar")
    )
    cfg = OmegaConf.load(run.config)
    cfg.stage.module = {
        "_target_": "ldm_train.metrics.reference.read_validation",
        "urls": f"pipe:touch {marker}; cat {good}",
        "loader": {"_target_": "ldm_train.data.stream.LoaderConfig"},
        "limit": 1,
    }
    OmegaConf.save(cfg, run.config)
    assert export_main([str(run.path)]) == 2
    assert evaluate_main([str(run.last_checkpoint), "--out", str(tmp_path / "ev")]) == 2
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 2 and all("read_validation" in line for line in errors)
    assert not marker.exists() and not (tmp_path / "ev").exists()


def test_a_file_cannot_extend_what_is_allowed(vae_run, tmp_path):
    """The second: a node that calls export_checkpoint itself with an allowlist of its own."""
    run = copy_run(vae_run, tmp_path / "run")
    marker = tmp_path / "ran"
    (tmp_path / "payload.pkl").write_bytes(pickle.dumps(Payload(marker)))
    cfg = OmegaConf.load(run.config)
    cfg.stage.module = {
        "_target_": "ldm_train.export.export_checkpoint",
        "target": str(tmp_path / "payload.pkl"),
        "trusted": ["torch.load"],
        "allow": ["torch.load"],
    }
    OmegaConf.save(cfg, run.config)
    with pytest.raises(UserError, match="'ldm_train.export.export_checkpoint', which is not one"):
        export_checkpoint(run.path)
    with pytest.raises(TypeError):  # only a Trusted built from the command line extends it
        rebuild(cfg.stage.module, run.config, "stage.module", ["torch.load"])
    assert not marker.exists()


def test_an_export_config_with_a_pipe_url_runs_nothing_under_evaluate(trained, tmp_path, capsys):
    """The third: evaluate EXPORT reads data.val_urls from the run's config.yaml beside it."""
    run = copy_run(RunDir(trained[1].parent), tmp_path / "run")
    marker = tmp_path / "MARK"
    cfg = OmegaConf.load(run.config)
    shards = str(cfg.data.val_urls)
    cfg.data.val_urls = f"pipe:touch {marker}; cat {shards.replace('{000000..000001}', '000000')}"
    OmegaConf.save(cfg, run.config)
    out = tmp_path / "evaluation"
    assert evaluate_main([str(run.export), "--out", str(out)]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert "data.val_urls='pipe:touch" in line and "may only name local files" in line
    assert not marker.exists() and not out.exists()
    # A URL the user types is theirs to run: the same pipe: on the command line is read.
    quick = ["--n", "1", "--steps", "1", "--max-reference", "4", "--max-prompts", "1"]
    assert (
        evaluate_main([str(run.export), "--out", str(out), *quick, "--val-urls", cfg.data.val_urls])
        == 0
    )
    assert marker.exists() and (out / "metrics.json").is_file()


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
