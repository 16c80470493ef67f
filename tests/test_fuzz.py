"""The fuzz table of the commands (issue 19): generate, evaluate, export and cache_latents, each fed
bad values and broken files, must end with exit code 2 and one line that names the input: never a
traceback, never a hang (a deadline), never a write outside the output folder, never a payload
run. Each case calls the command's main(argv) in this process (what `python -m ...` runs); the
training command's table is tests/test_fuzz_train.py."""

from __future__ import annotations

import io
import shutil
import tarfile
from pathlib import Path

import pytest
import torch
import yaml
from fuzzing import (
    Payload,
    assert_one_line,
    assert_written_only_under,
    damaged_exports,
    pickled_folder,
    run_copy,
    run_main,
    snapshot,
    tar_shard,
)
from PIL import Image

from ldm_train.cache_latents import cache_latents
from ldm_train.cache_latents import main as cache_main
from ldm_train.evaluate import main as evaluate_main
from ldm_train.export import main as export_main
from ldm_train.generate import main as generate_main

NO_GPU = not torch.cuda.is_available()
PIPELINE_WEIGHTS = "diffusion_pytorch_model.safetensors"
COMMANDS = {
    "generate": generate_main,
    "evaluate": evaluate_main,
    "export": export_main,
    "cache_latents": cache_main,
}

# command, argv ({name}: a file of the `files` fixture; {out}: the output folder), what the line says
CASES = [
    ("generate", ["{export}", "--prompt", "x", "--width", "0", "--height", "0"], "--width: '0' must be an integer from 1 to 4096"),
    ("generate", ["{export}", "--prompt", "x", "--width", "100000", "--height", "100000"], "'100000' must be an integer from 1 to 4096"),
    ("generate", ["{export}", "--prompt", "x", "--width", "34"], "width and height must be multiples of 4"),
    ("generate", ["{export}", "--prompt", "x", "--guidance", "nan"], "--guidance: 'nan' must be a finite number"),
    ("generate", ["{export}", "--prompt", "x", "--guidance", "inf"], "--guidance: 'inf' must be a finite number"),
    ("generate", ["{export}", "--prompt", "x", "--guidance", "0.5"], "--guidance: '0.5' must be a finite number from 1 to 100"),
    ("generate", ["{export}", "--prompt", "x", "--steps", "5000"], "--steps: '5000' must be an integer from 1 to 1000"),
    ("generate", ["{export}", "--prompt", "x", "--steps", "0"], "--steps: '0' must be an integer"),
    ("generate", ["{export}", "--prompt", "x", "--seed", str(2**64)], f"--seed: '{2**64}' must be an integer from 0 to 4294967295"),
    ("generate", ["{export}", "--prompt", "x", "--seed", "-1"], "--seed: '-1' must be an integer"),
    ("generate", ["{export}", "--prompt", "x", "--n", "0"], "--n: '0' must be an integer"),
    ("generate", ["{export}", "--prompt", "x", "--n", "many"], "--n: 'many' must be an integer"),
    ("generate", ["{export}", "--prompt", "x", "--batch-size", "-1"], "--batch-size: '-1' must be an integer"),
    ("generate", ["{export}", "--prompt", "x", "--sampler", "bogus"], "--sampler: 'bogus' must be one of: ddim, euler, dpmpp"),
    ("generate", ["{export}", "--prompts-file", "{latin1}"], "is not UTF-8 text"),
    ("generate", ["{export}", "--prompts-file", "{nowhere}"], "--prompts-file"),
    ("generate", ["{export}", "--prompt", "x", "--out", "{afile}"], "is a file"),
    ("generate", ["{export}", "--prompt", "x", "--out", "{userdir}"], "holds files ldm_train did not write"),
    ("generate", ["{export}", "--prompt", "x", "--device", "bogus"], "--device bogus: not a device"),
    pytest.param("generate", ["{export}", "--prompt", "x", "--device", "cuda"], "visible GPU(s)", marks=pytest.mark.skipif(not NO_GPU, reason="has a GPU")),
    ("generate", ["{nowhere}", "--prompt", "x"], "no ldm_train_pipeline.json"),
    ("generate", ["{half_written}", "--prompt", "x"], "unet: no safetensors weights in"),
    ("generate", ["{truncated}", "--prompt", "x"], "cannot load"),
    ("generate", ["{pickled}", "--prompt", "x"], "diffusion_pytorch_model.bin: pickles, not loaded"),
    ("generate", ["{malformed_index}", "--prompt", "x"], "ldm_train_pipeline.json"),
    ("generate", ["{index_of_a_list}", "--prompt", "x"], "is not an export index"),
    ("generate", ["{partial_index}", "--prompt", "x"], "image_size=null must be an integer"),
    ("generate", ["{lying_index}", "--prompt", "x"], "sampling.steps='many' must be an integer"),
    ("generate", ["{huge_index_size}", "--prompt", "x"], "image_size=1000000000 must be an integer from 1 to 4096"),
    ("evaluate", ["{export}", "--n", "0"], "--n: '0' must be an integer"),
    ("evaluate", ["{export}", "--max-reference", "0"], "--max-reference: '0' must be an integer"),
    ("evaluate", ["{export}", "--guidance", "nan"], "--guidance: 'nan' must be a finite number"),
    ("evaluate", ["{export}", "--steps", "5000"], "--steps: '5000' must be"),
    ("evaluate", ["{export}", "data.image_size=0"], "data.image_size=0 must be an integer"),
    ("evaluate", ["{export}", "oops"], "unexpected argument 'oops'"),
    ("evaluate", ["{export}", "--out", "{afile}"], "is a file"),
    ("evaluate", ["{bad_yaml_export}"], "is not a readable config"),
    ("evaluate", ["{no_stage_run}"], "stage.name=None with a stage.module is not a run"),
    ("evaluate", ["{text_ckpt_run}"], "as a checkpoint without running code"),
    ("evaluate", ["{vae_config_run}"], "is a stage=vae checkpoint; evaluate needs a unet run"),
    ("evaluate", ["{half_written}"], "no safetensors weights in"),
    ("export", ["{nowhere}"], "no checkpoint at"),
    ("export", ["{no_ckpt_run}"], "no checkpoint at"),
    ("export", ["{bad_yaml_run}"], "is not a readable config"),
    ("export", ["{list_yaml_run}"], "is not a config (a mapping"),
    ("export", ["{interpolating_run}"], "is an interpolation"),
    ("export", ["{no_stage_run}"], "is not a run of one of the stages"),
    ("export", ["{text_ckpt_run}"], "as a checkpoint without running code"),
    ("export", ["{empty_ckpt_run}"], "as a checkpoint without running code"),
    ("export", ["{list_ckpt_run}"], "is not a training checkpoint"),
    ("export", ["{pickle_ckpt_run}"], "as a checkpoint without running code"),
    ("export", ["{misfit_run}"], "its weights do not fit the stage"),
    ("export", ["{run}", "--out", "{afile}"], "is a file"),
    ("export", ["{run}", "--out", "{userdir}"], "holds files ldm_train did not write"),
    ("export", ["{run}", "--allow-target"], "argument --allow-target: expected one argument"),
    ("cache_latents", ["--batch-size", "-1"], "--batch-size: '-1' must be an integer"),
    ("cache_latents", ["--batch-size", "abc"], "--batch-size: 'abc' must be an integer"),
    ("cache_latents", ["--dtype", "float8"], "argument --dtype: invalid choice: 'float8'"),
    ("cache_latents", ["--part", "3/2"], "--part 3/2: need 0 <= K < N"),
    ("cache_latents", ["--part", "x"], "--part x: write K/N"),
    ("cache_latents", ["--out", "{afile}", "{vae}", "{clip}", "{shards}"], "is a file"),
    ("cache_latents", ["--out", "{userdir}", "{vae}", "{clip}", "{shards}"], "holds files ldm_train did not write"),
    ("cache_latents", ["data.batch_size=0", "{vae}", "{clip}", "{shards}"], "data.batch_size=0 must be an integer >= 1"),
    ("cache_latents", ["data.bogus=1", "{vae}", "{clip}", "{shards}"], "unknown option data.bogus"),
    ("cache_latents", ["stage.vae=null", "{clip}", "{shards}"], "stage.vae=null (pixel space)"),
    ("cache_latents", ["stage.vae={pickled_vae}", "{clip}", "{shards}"], "pickles, not loaded"),
    ("cache_latents", ["{vae}", "stage.text_encoder={pickled_clip}", "{shards}"], "not a state dict that loads without running code"),
    ("cache_latents", ["{vae}", "{clip}", "data.train_urls={not_tar}"], "check data.train_urls"),
]  # fmt: skip


@pytest.fixture(scope="module")
def files(tmp_path_factory, trained, upstream, tiny_shards) -> dict[str, str]:
    """The inputs the cases name: the trained export and run, and broken copies of them."""
    root = tmp_path_factory.mktemp("fuzz_inputs")
    export, marker = trained[1], root / "PAYLOAD_RAN"
    found = {
        **damaged_exports(export, root / "exports", marker),
        **damaged_runs(export.parent, root / "runs", marker),
    }
    (root / "afile").write_text("a file")
    (root / "latin1.txt").write_bytes("un caf\xe9 rouge\n".encode("latin-1"))
    user = root / "userdir"
    (user / "unet").mkdir(parents=True)
    (user / "unet" / "mine.txt").write_text("mine")
    return {
        **{name: str(path) for name, path in found.items()},
        "export": str(export),
        "run": str(export.parent),
        "afile": str(root / "afile"),
        "latin1": str(root / "latin1.txt"),
        "nowhere": str(root / "nowhere"),
        "userdir": str(user),
        "marker": str(marker),
        "vae": f"stage.vae={upstream['vae']}",
        "clip": f"stage.text_encoder={upstream['clip']}",
        "shards": f"data.train_urls='{tiny_shards['train_urls']}'",
        "pickled_vae": str(pickled_folder(upstream["vae"], root / "vae", "diffusion_pytorch_model.bin", marker)),
        "pickled_clip": str(pickled_folder(upstream["clip"], root / "clip", "open_clip_pytorch_model.bin", marker)),
        "not_tar": str(tar_free(root / "not-a-tar.tar")),
    }  # fmt: skip


def damaged_runs(run: Path, root: Path, marker: Path) -> dict[str, Path]:
    """Copies of a unet run folder, its config.yaml or last.ckpt broken one way each."""
    config = yaml.safe_load((run / "config.yaml").read_text())
    text = (run / "config.yaml").read_text()
    found = {
        name: run_copy(run, root / name, config_text, ckpt)
        for name, config_text, ckpt in [
            ("bad_yaml_run", "stage: [unclosed", None),
            ("list_yaml_run", "- a\n- b\n", None),
            ("interpolating_run", "stage:\n  name: unet\n  module: {x: '${oc.env:HOME}'}\n", None),
            ("no_stage_run", yaml.safe_dump({k: v for k, v in config.items() if k != "stage"}), None),
            ("vae_config_run", yaml.safe_dump({**config, "stage": {**config["stage"], "name": "vae"}}), None),
            ("misfit_run", text.replace("layers_per_block: 1", "layers_per_block: 2"), None),
            ("text_ckpt_run", None, b"not a checkpoint\n"),
            ("empty_ckpt_run", None, b""),
            ("list_ckpt_run", None, b""),
            ("pickle_ckpt_run", None, b""),
            ("no_ckpt_run", None, b""),
        ]
    }  # fmt: skip
    torch.save([1, 2], found["list_ckpt_run"] / "checkpoints" / "last.ckpt")
    payload = {"state_dict": Payload(marker)}
    torch.save(payload, found["pickle_ckpt_run"] / "checkpoints" / "last.ckpt")
    (found["no_ckpt_run"] / "checkpoints" / "last.ckpt").unlink()
    found["bad_yaml_export"] = shutil.copytree(run / "export", root / "bad_yaml" / "export")
    (root / "bad_yaml" / "config.yaml").write_text("data: {val_urls: [")
    return found


def tar_free(path: Path) -> Path:
    path.write_text("this is not a tar file\n" * 20)
    return path


@pytest.mark.parametrize(
    "command, argv, expected",
    CASES,
    ids=[f"{c[0] if isinstance(c, tuple) else c.values[0]}-{i}" for i, c in enumerate(CASES)],
)
def test_a_bad_input_is_one_line_and_exit_code_2(
    command, argv, expected, files, tmp_path, monkeypatch, capsys
):
    out, cwd = tmp_path / "out", tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # default output folders (./samples ...) land here: none may appear
    args = [a.format(**files, out=out) for a in argv]
    if "--out" not in args and command != "export":
        args += ["--out", str(out)] if command != "cache_latents" else []
    if command == "cache_latents":
        args += [f"paths.output_root={out}", "data.make_dataset=null"]
    roots = [tmp_path, Path(files["export"]).parent.parent, Path(files["marker"]).parent]
    before = [snapshot(root) for root in roots]
    code, err = run_main(COMMANDS[command], args, capsys)
    assert_one_line(code, err, expected)
    for root, seen in zip(roots, before, strict=True):
        assert_written_only_under(root, seen, out)
    assert not Path(files["marker"]).exists()  # no payload ran


def test_cache_latents_keeps_member_names_inside_the_shard(unet_cfg, upstream, tmp_path):
    """Sample keys such as ../escape or /etc/x would become member names that land outside the
    folder the cache is extracted to: such samples are skipped and counted."""
    cfg = unet_cfg()
    shard = tar_shard(
        tmp_path / "keys.tar",
        {
            "fine/0001": sample_bytes(),
            "../escape": sample_bytes(),
            "/abs/path": sample_bytes(),
            "a/../../b": sample_bytes(),
        },
    )
    cfg.data.train_urls = str(shard)
    info = cache_latents(cfg, tmp_path / "cache")
    assert info["samples_written"] == 1 and info["skipped"] == {"unsafe member name": 3}
    with tarfile.open(tmp_path / "cache" / "train-000000.tar") as tar:
        names = tar.getnames()
    assert names and all(name.startswith("fine/0001.") for name in names)


def sample_bytes() -> dict[str, bytes]:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(buffer, format="PNG")
    return {"png": buffer.getvalue(), "txt": b"a red square"}
