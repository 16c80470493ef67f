"""Generation: the export folder loads on its own and samples with every sampler, the CLI writes the
same PNGs for the same seed, errors are one line; and the whole chain (stage=all) end to end."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import ldm_train.diffusion.pipeline as pipeline_module
from ldm_train.chain import chain_prompts, stage_overrides
from ldm_train.config import compose_config
from ldm_train.diffusion.pipeline import Pipeline
from ldm_train.diffusion.sampler import SamplingOptions
from ldm_train.evaluate import main as evaluate_main
from ldm_train.generate import main
from ldm_train.metrics.reference import loader_options, read_validation


def test_export_is_self_contained_and_matches_the_trained_module(trained, tmp_path):
    module, export = trained
    moved = tmp_path / "copied"
    shutil.copytree(export, moved)  # a user copies the folder elsewhere
    pipeline = Pipeline.load(moved)
    assert pipeline.latent_shape == (4, 8, 8) and pipeline.text_encoder is not None
    prompts = ["a large red circle in the center on a blue background", "a small black square"]
    options = SamplingOptions(steps=3, guidance=3.0, seed=5)
    images = pipeline.generate(prompts, 2, options)
    assert images.shape == (4, 3, 32, 32) and images.abs().max() <= 1
    assert torch.allclose(images, module.pipeline().generate(prompts, 2, options), atol=1e-5)


@pytest.mark.parametrize("sampler", ["ddim", "euler", "dpmpp"])
def test_every_sampler_samples(trained, sampler):
    pipeline = Pipeline.load(trained[1])
    images = pipeline.generate(["a red circle"], 2, SamplingOptions(sampler=sampler, steps=3))
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()


def test_generate_cli_same_seed_same_pngs(trained, tmp_path):
    export = trained[1]
    args = [str(export), "--prompt", "a red circle", "--prompt", "a blue cross", "--n", "2"]
    args += ["--steps", "3", "--guidance", "4.0"]
    for name, seed in [("a", "0"), ("b", "0"), ("c", "1")]:
        assert main([*args, "--seed", seed, "--out", str(tmp_path / name)]) == 0
    files = sorted(p.name for p in (tmp_path / "a").glob("*.png"))
    assert files == ["000-000.png", "000-001.png", "001-000.png", "001-001.png", "grid.png"]
    for file in files:
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes()
    assert (tmp_path / "a" / "000-000.png").read_bytes() != (
        tmp_path / "c" / "000-000.png"
    ).read_bytes()
    listing = json.loads((tmp_path / "a" / "images.json").read_text())
    assert listing[3] == {
        "file": "001-001.png",
        "prompt": "a blue cross",
        "seed": 1,
        "width": 32,
        "height": 32,
    }


def test_generate_draws_what_the_export_recorded_unless_told(trained, tmp_path, monkeypatch):
    """An option not given is the export's: its recorded sampling and image size (issue 21)."""
    export = shutil.copytree(trained[1], tmp_path / "export")
    index_file = export / "ldm_train_pipeline.json"
    recorded = {"sampler": "euler", "steps": 3, "guidance": 1.5, "seed": 7, "batch_size": 2}
    index_file.write_text(json.dumps({**json.loads(index_file.read_text()), "sampling": recorded}))
    drawn = []
    real_sample = pipeline_module.sample

    def spy(unet, config, prompts, seeds, shape, options, **parts):
        drawn.append((options, tuple(shape), list(seeds)))
        return real_sample(unet, config, prompts, seeds, shape, options, **parts)

    monkeypatch.setattr(pipeline_module, "sample", spy)
    base = [str(export), "--prompt", "a red circle", "--n", "2"]
    assert main([*base, "--out", str(tmp_path / "default")]) == 0
    assert drawn[-1] == (SamplingOptions(**recorded), (4, 8, 8), [7, 8])
    listing = json.loads((tmp_path / "default" / "images.json").read_text())
    assert [image["seed"] for image in listing] == [7, 8]
    given = ["--sampler", "ddim", "--steps", "2", "--guidance", "3", "--width", "48"]
    assert main([*base, *given, "--out", str(tmp_path / "given")]) == 0
    options = SamplingOptions(sampler="ddim", steps=2, guidance=3.0, seed=7, batch_size=2)
    assert drawn[-1] == (options, (4, 8, 12), [7, 8])  # what is not given stays the export's
    # evaluate declares the same options (ldm_train.cli) with the same defaults.
    quick = ["--n", "1", "--max-reference", "2", "--max-prompts", "1", "--features", "clip"]
    assert evaluate_main([str(export), *quick, "--out", str(tmp_path / "evaluation")]) == 0
    assert drawn[-1][0] == SamplingOptions(**recorded)
    metrics = json.loads((tmp_path / "evaluation" / "metrics.json").read_text())
    assert metrics["settings"]["sampling"] == recorded


def test_generate_shows_its_progress(trained, tmp_path, capsys):
    args = [str(trained[1]), "--prompt", "a red circle", "--n", "2", "--steps", "3"]
    assert main([*args, "--out", str(tmp_path)]) == 0
    shown = capsys.readouterr().err
    assert "sampling" in shown and "3/3" in shown  # one batch of 3 sampling steps


def test_the_chain_without_prompts_generates_for_val_captions(make_cfg, tiny_shards):
    """Own data has no data.prompts: stage=all's check generates for the val shards' captions,
    with their sample json as labels (the shapes data's json names shape and colour)."""
    cfg = make_cfg("stage=all", "data.prompts=null", "stage.evaluate.max_prompts=3")
    prompts, captions, labels = chain_prompts(cfg, 32)
    expected = read_validation(tiny_shards["val_urls"], loader_options({}, 32), 3)
    assert prompts == captions == expected.captions and labels == expected.metas
    assert {"shape", "colour"} <= set(labels[0])
    assert chain_prompts(make_cfg("stage=all", "data.prompts=null", "data.val_urls=null"), 32) == (
        [],
        [],
        [],
    )


def test_generate_cli_errors_are_one_line(trained, tmp_path, capsys):
    assert main([str(tmp_path / "nothing"), "--prompt", "x", "--out", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "ldm_train_pipeline.json" in error
    assert main([str(trained[1]), "--out", str(tmp_path)]) == 2
    assert "no prompt" in capsys.readouterr().err


@pytest.mark.slow
def test_chain_trains_all_stages_and_checks_its_samples(tmp_path, run_cli):
    """python -m ldm_train stage=all with a few steps per stage: every export, the grid, the score."""
    steps = [f"stage.chain.{stage}.max_steps=2" for stage in ("clip", "vae", "unet")]
    args = [
        *steps,
        "stage.evaluate.n_per_prompt=1",
        "stage.evaluate.steps=2",
        "logger=csv",
        "trainer.limit_val_batches=1",
        "trainer.enable_progress_bar=false",
        "data.num_workers=0",
        "data.batch_size=8",
        "data.batches_per_epoch=2",
        "data.make_dataset.n_train=256",
        "data.make_dataset.n_val=64",
        "stage.chain.unet.overrides=['stage.module.validation.samples_per_prompt=1',"
        "'stage.module.validation.sampling.steps=2']",
    ]
    result = run_cli(["-m", "ldm_train", "stage=all", *args], tmp_path, timeout=600)
    outputs = tmp_path / "outputs" / "shapes"
    for stage in ("clip", "vae", "unet"):
        assert (outputs / stage / "export").is_dir(), stage
    assert (outputs / "unet" / "export" / "model_index.json").is_file()  # a diffusers pipeline
    assert (outputs / "all" / "samples" / "grid.png").is_file()
    results = json.loads((outputs / "all" / "results.json").read_text())
    assert 0 <= results["chain/accuracy"] <= 1 and "chain/shape_acc" in results
    assert "chain/accuracy" in result.stdout + result.stderr


def test_chain_stage_overrides_take_the_presets_steps_where_max_steps_is_null():
    cfg = compose_config(["stage=all"])
    vae = stage_overrides(cfg, "vae", ["seed=1"])
    assert vae[:2] == ["stage=vae", "model=vae/tiny"] and vae[-1] == "seed=1"
    assert not any(o.startswith("trainer.max_steps=") for o in vae)
    assert compose_config(vae).trainer.max_steps == compose_config(vae).model.max_steps == 2400
    unet = stage_overrides(cfg, "unet", ["model.lr=1e-4"])
    assert f"trainer.max_steps={cfg.stage.chain.unet.max_steps}" in unet
    assert unet[-1] == "model.lr=1e-4"  # the user's overrides come last: they win
    assert compose_config(unet).model.lr == 1e-4
    # The U-Net stage gets the exports the chain made, whatever the config would have guessed.
    exports = {"clip": Path("/elsewhere/clip export"), "vae": Path("/elsewhere/vae")}
    unet = compose_config(stage_overrides(cfg, "unet", [], exports))
    assert (unet.stage.text_encoder, unet.stage.vae) == ("/elsewhere/clip export", "/elsewhere/vae")
    user = compose_config(stage_overrides(cfg, "unet", ["stage.vae=null"], exports))
    assert user.stage.vae is None  # and the user's word is last
