"""Shapes beyond the square: every stage trains on bucketed batches of several shapes
(data=shapes_mixed), the CLIP tower squashes them as open_clip's preprocess does, bucketed latent
caches keep each latent at its bucket's size, generation at other sizes, and continuing a U-Net at
a new image size from an earlier run's weights (a resolution stage)."""

from __future__ import annotations

import io
import json

import lightning as L
import numpy as np
import open_clip
import pytest
import safetensors.torch
import torch
from hydra.utils import instantiate
from open_clip.transform import image_transform
from PIL import Image

from ldm_train.cache_latents import cache_latents
from ldm_train.data.datamodule import WebDataModule, expand_urls
from ldm_train.data.stream import CacheError, StreamStats, read_pass
from ldm_train.diffusion.pipeline import Pipeline
from ldm_train.diffusion.sampler import SamplingOptions, latent_shape, sample
from ldm_train.diffusion.sizes import generate_sized, prompt_sizes, save_rows
from ldm_train.errors import UserError
from ldm_train.export import export_checkpoint
from ldm_train.train import train

pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log")
SHAPES = {(32, 32), (32, 48), (48, 32)}  # (height, width) of data=shapes_mixed's buckets


class ShapeLog(L.Callback):
    """The (height, width) of every training batch (of its images, or cached latents)."""

    def __init__(self) -> None:
        self.shapes: list[tuple[int, int]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.shapes.append(tuple((batch["image"] if "image" in batch else batch["latent"]).shape))


LOG_SHAPES = f"+callbacks.shapes={{_target_:{__name__}.ShapeLog}}"


def shape_log(objects: dict) -> list[tuple]:
    return next(c for c in objects["trainer"].callbacks if isinstance(c, ShapeLog)).shapes


STAGES = {
    "clip": ["stage=clip", "model.net.text_cfg.layers=1"],
    "vae": ["stage=vae"],
    "unet": ["model.net.block_out_channels=[32,64]", "model.net.norm_num_groups=16"],
}


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_trains_on_batches_of_several_shapes(stage, mixed_cfg, unet_overrides):
    options = STAGES[stage] + (unet_overrides if stage == "unet" else [])
    steps = ["trainer.max_steps=3", "data.batches_per_epoch=3", "trainer.limit_val_batches=2"]
    cfg = mixed_cfg(*options, *steps, LOG_SHAPES)
    metrics, objects = train(cfg)
    shapes = {shape[-2:] for shape in shape_log(objects)}
    assert shapes <= SHAPES and len(shapes) > 1
    assert all(
        torch.isfinite(torch.tensor(v)) for k, v in metrics.items() if k.startswith("train/")
    )
    assert "data/bucket_moved" in metrics and "data/bucket_48x32" in metrics  # fill is logged
    export = objects["export_dir"]
    if stage == "clip":  # the export squashes like training did, from a checkpoint too
        for folder in (export, export_checkpoint(objects["run_dir"], export.parent / "again")):
            config = json.loads((folder / "open_clip_config.json").read_text())
            assert config["preprocess_cfg"]["resize_mode"] == "squash"
    if stage == "vae":  # a 48x32 image comes back 48x32
        vae = objects["module"].net.eval()
        with torch.no_grad():
            assert vae(torch.zeros(1, 3, 32, 48)).sample.shape == (1, 3, 32, 48)
    if stage == "unet":
        assert torch.isfinite(torch.tensor(metrics["val/mse"]))


def test_clip_towers_need_their_square_and_the_stage_squashes_like_open_clip(mixed_cfg):
    """open_clip's ViT has a fixed positional grid: a 32x48 batch does not fit it. The stage
    squashes such batches to its square as open_clip's preprocess does with resize_mode="squash"
    (what its export then says)."""
    vit = open_clip.CLIP(
        embed_dim=32,
        vision_cfg={"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
        text_cfg={"context_length": 8, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    )
    with pytest.raises(RuntimeError, match="must match"):
        vit.visual(torch.zeros(1, 3, 32, 48))
    stage = instantiate(mixed_cfg("stage=clip", "model.net.text_cfg.layers=1").stage.module)
    preprocess = stage.net.visual.preprocess_cfg
    assert preprocess["resize_mode"] == "squash"
    image = Image.new("RGB", (48, 32), (200, 40, 40))
    image.paste((40, 40, 200), (24, 0, 48, 32))  # blue right half
    reference = image_transform(
        32,
        False,
        preprocess["mean"],
        preprocess["std"],
        resize_mode="squash",
        interpolation="bilinear",
    )(image)
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 127.5 - 1
    ours = stage.normalize(pixels)[0]
    assert ours.shape == reference.shape == (3, 32, 32)
    assert (ours - reference).abs().mean() < 0.02  # bilinear on tensors vs on PIL


HALF_UNET = ("model.net.block_out_channels=[32,64]", "model.net.norm_num_groups=16")


@pytest.fixture
def mixed_unet_cfg(mixed_cfg, unet_overrides):
    return lambda *overrides: mixed_cfg(*unet_overrides, *HALF_UNET, *overrides)


def test_a_bucketed_cache_keeps_each_latent_at_its_buckets_size(mixed_unet_cfg, tmp_path):
    info = cache_latents(mixed_unet_cfg(), tmp_path / "cache", part=(0, 4))  # one shard of 4
    assert info["buckets"] == [(32, 48), (32, 32), (48, 32)] and info["samples_written"] == 64
    shard = expand_urls(info["train_urls"])[0]
    for raw in read_pass([shard], 0, 1, StreamStats()):
        latent = np.load(io.BytesIO(raw["latent.npy"]))
        width, height = json.loads(raw["json"])["canvas"]
        assert latent.shape == (8, height // 4, width // 4)  # the tiny VAE: factor 4
    cached = f"data.train_urls='{shard}'"
    metrics, objects = train(mixed_unet_cfg(cached, "trainer.max_steps=2", LOG_SHAPES))
    shapes = {shape[-2:] for shape in shape_log(objects)}
    assert shapes <= {(8, 8), (8, 12), (12, 8)} and len(shapes) > 1  # never mixed in a batch
    assert torch.isfinite(torch.tensor(metrics["train/mse"]))
    square = mixed_unet_cfg(cached, "data.buckets=null")  # the cache's shapes, no buckets
    with pytest.raises(CacheError, match="mixes latent shapes"):
        next(iter(WebDataModule.from_config(square.data).train_dataloader()))


# ---------------------------------------------------------------- generation at other sizes


OPTIONS = SamplingOptions(steps=2, guidance=2.0, seed=3)


def test_sampling_at_any_multiple_of_the_vaes_factor(trained):
    pipeline = Pipeline.load(trained[1])
    unet, vae = pipeline.unet, pipeline.vae
    assert latent_shape(unet, vae, (48, 32)) == (4, 8, 12)
    for size in [(30, 32), (32, 2)]:
        with pytest.raises(UserError, match="multiples of 4"):
            latent_shape(unet, vae, size)
    config = dict(pipeline.scheduler.config)
    wide = sample(unet, config, ["a"], [0], (4, 8, 12), OPTIONS, vae, pipeline.text_encoder)
    assert wide.shape == (1, 3, 32, 48) and torch.isfinite(wide).all()


def test_each_prompt_at_its_own_size(trained, tmp_path):
    pipeline = Pipeline.load(trained[1])
    prompts = [
        {"caption": "a red circle", "width": 48, "height": 32},
        "a blue square",
        {"caption": "a tall cross", "width": 32, "height": 48},
    ]
    sizes = prompt_sizes(prompts, pipeline.image_size)
    assert sizes == [(48, 32), (32, 32), (32, 48)]
    captions = ["a red circle", "a blue square", "a tall cross"]
    rows = generate_sized(pipeline, captions, sizes, 2, OPTIONS)
    assert [tuple(row.shape) for row in rows] == [(2, 3, 32, 48), (2, 3, 32, 32), (2, 3, 48, 32)]
    # The square prompt is what the pipeline's own (square) generate gives.
    assert torch.equal(rows[1], pipeline.generate(["a blue square"], 2, OPTIONS))
    paths = save_rows(rows, captions, OPTIONS.seed, tmp_path)
    assert [Image.open(path).size for path in paths[::2]] == [(48, 32), (32, 32), (32, 48)]
    assert Image.open(tmp_path / "grid.png").size[1] > 3 * 48
    with pytest.raises(UserError, match="positive integers"):
        prompt_sizes([{"caption": "x", "width": "wide"}], 32)


# ---------------------------------------------------------------- resolution stages


class FirstWeights(L.Callback):
    """The net's weights when training starts."""

    def on_train_start(self, trainer, pl_module) -> None:
        self.weights = {k: v.detach().clone() for k, v in pl_module.net.state_dict().items()}


def test_a_unet_continues_from_earlier_weights_at_a_new_image_size(trained, unet_cfg):
    """`model.pretrained=<run>/export resume=never data.image_size=48`: the earlier weights, 48 px
    batches, a fresh optimizer and step; the export draws 48 px by default, in diffusers too."""
    cfg = unet_cfg(
        "data.image_size=48",
        "resume=never",
        "trainer.max_steps=2",
        f"model.pretrained={trained[1]}",
        f"+callbacks.first={{_target_:{__name__}.FirstWeights}}",
        LOG_SHAPES,
    )
    metrics, objects = train(cfg)
    first = next(c for c in objects["trainer"].callbacks if isinstance(c, FirstWeights))
    unet_dir = trained[1] / "unet"
    earlier = safetensors.torch.load_file(unet_dir / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(first.weights[k], earlier[k]) for k in earlier)
    assert shape_log(objects) == [(8, 3, 48, 48)] * 2 and objects["trainer"].global_step == 2
    export = objects["export_dir"]
    assert json.loads((export / "ldm_train_pipeline.json").read_text())["image_size"] == 48
    assert json.loads((unet_dir / "config.json").read_text())["sample_size"] == 8  # 32 px
    assert json.loads((export / "unet" / "config.json").read_text())["sample_size"] == 12  # 48
    assert torch.isfinite(torch.tensor(metrics["train/mse"]))


@pytest.mark.slow
def test_generate_cli_takes_a_width_and_a_height(trained, tmp_path, run_cli):
    out = tmp_path / "wide"
    args = ["-m", "ldm_train.generate", str(trained[1]), "--prompt", "a red circle", "--n", "2"]
    run_cli([*args, "--steps", "2", "--width", "48", "--height", "32", "--out", str(out)], tmp_path)
    assert Image.open(out / "000-001.png").size == (48, 32)
    bad = run_cli([*args, "--width", "30", "--out", str(out)], tmp_path, check=False)
    assert bad.returncode == 2 and "multiples of 4" in bad.stderr
