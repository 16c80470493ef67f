"""Validation samples and metrics in the stages: prompts from the val shards when data.prompts is
null, a grid with a caption per prompt (W&B, TensorBoard, PNG + .txt), sampled with the EMA weights
every k-th validation; the ranks share the generation (the same forward passes on every rank, a
barrier at each one) and log what one process logs; the VAE logs its reconstruction FD."""

from __future__ import annotations

import csv
import json
from datetime import timedelta
from pathlib import Path
from unittest.mock import MagicMock

import lightning as L
import numpy as np
import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from PIL import Image
from test_ddp import read_rank_records, write_rank_record

from ldm_train.callbacks.images import image_grid, log_image_rows
from ldm_train.data.datamodule import expand_urls
from ldm_train.diffusion.sampler import per_prompt
from ldm_train.errors import UserError
from ldm_train.metrics.features import to_uint8
from ldm_train.metrics.reference import loader_options, read_validation
from ldm_train.metrics.sample import SampleMetrics
from ldm_train.metrics.share import assemble, rank_share, sample_share
from ldm_train.metrics.validation import MetricOptions, ValidationDraws, ValidationOptions
from ldm_train.train import train

pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log")

VALIDATION = "stage.module.validation"
SAMPLE_FIGURES = {"fd_clip", "kid_clip", "kid_clip_std", "clip_score", "shape_acc", "accuracy"}
BARRIER_S = 20  # a rank sampling alone fails its barrier in this time instead of hanging


def val_captions(tiny_shards: dict, n: int) -> list[str]:
    return read_validation(tiny_shards["val_urls"], loader_options({}, 32), n).captions


def grid_pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def expected_pixels(images: torch.Tensor, n: int) -> np.ndarray:
    """The PNG log_image_rows writes for 8-bit images, n per row (torchvision's save_image)."""
    grid = image_grid(list(images.view(-1, n, *images.shape[1:])), n, value_range=(0, 255))
    return grid.mul(255).add(0.5).clamp(0, 255).byte().permute(1, 2, 0).numpy().astype(np.int16)


def test_val_captions_are_the_prompts_of_an_ema_grid_every_second_validation(unet_cfg, tiny_shards):
    cfg = unet_cfg(
        "data.prompts=null",
        f"{VALIDATION}.max_prompts=3",
        f"{VALIDATION}.samples_per_prompt=2",
        f"{VALIDATION}.metric_images=4",  # the first 3 captions' seed-0 images are the grid's
        f"{VALIDATION}.every_n_validations=2",
        "val_every_n_steps=2",  # validations at steps 2 and 4
        "trainer.limit_val_batches=1",
    )
    metrics, objects = train(cfg)
    module, run_dir = objects["module"], objects["run_dir"]
    captions = val_captions(tiny_shards, 4)[:3]
    assert module.samples.prompts == captions and module.samples.validations == 2
    assert module.samples.measured == val_captions(tiny_shards, 4)
    assert {f"val/{name}" for name in SAMPLE_FIGURES} <= set(metrics)
    assert 0 <= metrics["val/accuracy"] <= 1 and metrics["val/fd_clip"] > 0
    images_dir = run_dir / "images"
    assert sorted(p.name for p in images_dir.glob("samples_*")) == [
        "samples_step000004.png",
        "samples_step000004.txt",
    ]
    assert (images_dir / "samples_step000004.txt").read_text().splitlines() == captions
    exported = json.loads((objects["export_dir"] / "ldm_train_pipeline.json").read_text())
    assert exported["prompts"] == captions
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["validation_samples"] == {"validations": 2}
    # The grid is of the EMA weights, which training leaves in the module at its end (the last
    # step was validated): the EMA callback swaps the training weights back before a module's
    # on_validation_epoch_end would run, so that hook would draw another grid.
    repeated, seeds = per_prompt(captions, 2, 0)
    again = to_uint8(module.draw_images(repeated, seeds))
    drawn = grid_pixels(images_dir / "samples_step000004.png")
    assert np.abs(drawn - expected_pixels(again, 2)).max() <= 1


def test_image_rows_carry_their_captions_to_every_logger(tmp_path):
    rows = [torch.full((2, 3, 4, 4), -1.0), torch.ones(2, 3, 4, 4)]
    captions = ["a red circle", "a blue\ncross"]
    wandb, tensorboard = MagicMock(spec=WandbLogger), MagicMock(spec=TensorBoardLogger)
    trainer = MagicMock(is_global_zero=True, sanity_checking=False, global_step=3)
    trainer.default_root_dir = str(tmp_path)
    trainer.loggers = [wandb, tensorboard]
    assert log_image_rows(trainer, "samples", rows, captions) == ["wandb", "tensorboard"]
    call = wandb.log_image.call_args.kwargs
    assert call["key"] == "images/samples" and call["step"] == 3
    assert call["caption"] == ["a red circle", "a blue cross"] and len(call["images"]) == 2
    assert call["images"][0][:, 2:6, 2:6].max() == 0 and call["images"][1][:, 2:6, 2:6].min() == 1
    tensorboard.experiment.add_image.assert_called_once()
    text = tensorboard.experiment.add_text.call_args
    assert text.args[0] == "images/samples/captions" and "2. a blue cross" in text.args[1]
    trainer.loggers = []
    (png,) = log_image_rows(trainer, "samples", rows, captions)
    assert Path(png).with_suffix(".txt").read_text() == "a red circle\na blue cross\n"
    with pytest.raises(ValueError, match="2 rows but 1 captions"):
        log_image_rows(trainer, "samples", rows, captions[:1])


def test_shares_are_blocks_in_rank_order_and_assemble_in_order():
    for n, world in [(5, 2), (2, 4), (9, 3), (7, 1)]:
        prompts, seeds = [f"p{i}" for i in range(n)], list(range(n))

        def sample_fn(batch: list[str], batch_seeds: list[int]) -> torch.Tensor:
            return torch.tensor(batch_seeds, dtype=torch.float).view(-1, 1, 1, 1)

        shares = [sample_share(sample_fn, prompts, seeds, rank, world) for rank in range(world)]
        assert len({len(images) for images, _, _ in shares}) == 1  # the same forward passes
        own = torch.cat([images[:mine] for images, _, mine in shares]).flatten().tolist()
        assert own == seeds  # what torchmetrics gathers, rank by rank: one process's order
        gathered = torch.stack([images for images, _, _ in shares])
        assert assemble(gathered, n).flatten().tolist() == seeds
        block, prefix = len(shares[0][1]), max(1, n // 2)  # the first items only, as the grid's
        sent = gathered[:, : min(block, prefix)]
        assert assemble(sent, prefix, block).flatten().tolist() == seeds[:prefix]
    assert rank_share(5, 1, 2) == ([3, 4, 3], 2)


def test_metric_options_turn_off_what_needs_a_missing_clip(upstream, tmp_path, caplog):
    missing = str(tmp_path / "no-clip")
    with caplog.at_level("INFO", logger="ldm_train.metrics.validation"):
        assert MetricOptions(clip=missing).build("stage.module.metrics") is None
    assert f"stage.module.metrics.clip={missing} is no open_clip folder" in caplog.text
    metrics = MetricOptions(clip=str(upstream["clip"])).build("x")
    assert isinstance(metrics, SampleMetrics) and metrics.kind == "clip"
    assert MetricOptions(clip=str(upstream["clip"])).build("x", distances=False).kind is None
    with pytest.raises(UserError, match="Inception features need"):
        MetricOptions(clip=missing, features="inception").build("x")


def test_what_is_not_measured_is_not_drawn(upstream, tiny_shards):
    with pytest.raises(UserError, match="metric_images=1; need >= 2"):
        ValidationOptions(metric_images=1)
    samples = ValidationDraws(
        ValidationOptions(samples_per_prompt=0, metrics=MetricOptions(clip=str(upstream["clip"])))
    )
    urls = expand_urls(tiny_shards["val_urls"])
    samples.prepare(urls, loader_options({}, 32), conditional=True)
    assert samples.metrics is None and not samples.due()
    no_clip = ValidationDraws(ValidationOptions(metrics=MetricOptions(clip=None)))
    no_clip.prepare(urls, loader_options({}, 32), conditional=True)
    assert no_clip.prompts == val_captions(tiny_shards, 8) and no_clip.measured == []


def test_vae_logs_its_reconstruction_fd(make_cfg, upstream):
    cfg = make_cfg(
        "stage=vae",
        f"stage.module.metrics.clip={upstream['clip']}",
        "trainer.max_steps=2",
        "data.batches_per_epoch=1",
        "trainer.limit_val_batches=1",
    )
    metrics, objects = train(cfg)
    assert metrics["val/rfd_clip"] > 0 and metrics["val/rkid_clip"] == metrics["val/rkid_clip"]
    assert objects["module"].reconstruction_metrics.metrics.reference_frozen
    _, objects = train(make_cfg("stage=vae", "trainer.max_steps=1", "resume=never"))
    assert objects["module"].reconstruction_metrics.metrics is None  # no stage=clip export yet


# -- two processes -----------------------------------------------------------------------------


class SamplingForwards(L.Callback):
    """Counts the U-Net's forward passes while the validation samples are drawn, into
    <run dir>/forwards-rank<N>.json. Under DDP each of them also meets the other rank at a
    monitored barrier, which raises within BARRIER_S if one rank runs a forward pass alone (as a
    forward pass under FSDP, collective, would hang). Listed in the config, this callback runs its
    on_validation_epoch_end before the stage's sampling callback."""

    def __init__(self) -> None:
        self.counting, self.counts = False, []

    def setup(self, trainer, pl_module, stage) -> None:
        pl_module.net.register_forward_pre_hook(self.forward)

    def forward(self, module, args) -> None:
        if self.counting:
            self.counts[-1] += 1
            if dist.is_initialized():
                dist.monitored_barrier(timeout=timedelta(seconds=BARRIER_S))

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self.counting = True
        self.counts.append(0)

    def on_validation_end(self, trainer, pl_module) -> None:
        self.counting = False

    def on_train_end(self, trainer, pl_module) -> None:
        write_rank_record(trainer, "forwards", self.counts)


def logged_figures(run_dir: Path) -> dict[str, float]:
    (path,) = (run_dir / "csv").glob("version_*/metrics.csv")
    rows = [row for row in csv.DictReader(path.open()) if row.get("val/fd_clip")]
    (row,) = rows  # one sampling validation
    names = {f"val/{name}" for name in SAMPLE_FIGURES | {"colour_acc"}}
    return {key[4:]: float(row[key]) for key in row if key in names}


@pytest.mark.slow
def test_two_processes_share_the_samples_and_log_one_processs_figures(
    tmp_path, tiny_overrides, unet_overrides, tiny_shards, run_cli
):
    """A learning rate of 1e-30 moves no fp32 weight (the checks refuse 0): both runs validate the
    same U-Net, its initial weights, so they draw the same images."""
    options = [
        *unet_overrides,
        "model.lr=1e-30",
        "data.prompts=null",
        f"{VALIDATION}.max_prompts=5",  # 2 ranks: 3 images each, one of rank 1's padding
        f"{VALIDATION}.metric_images=5",  # the grid's images
        f"{VALIDATION}.sampling.batch_size=1",  # a forward pass per image and step
        f"{VALIDATION}.max_reference=40",
        "trainer.max_steps=2",
        "data.batches_per_epoch=2",
        "trainer.limit_val_batches=1",
        f"+callbacks.forwards={{_target_:{__name__}.SamplingForwards}}",
    ]
    ddp = ["trainer=ddp", "trainer.devices=2", "trainer.precision=32-true"]
    runs = {}
    for name, extra in {"one": [], "two": ddp}.items():
        output_root = tmp_path / name / "outputs"
        run_cli(["-m", "ldm_train", *tiny_overrides(output_root), *options, *extra], tmp_path)
        runs[name] = output_root / "shapes" / "unet"
    one, two = runs["one"], runs["two"]
    assert logged_figures(two) == pytest.approx(logged_figures(one), rel=1e-4, abs=1e-6)
    assert set(logged_figures(two)) == SAMPLE_FIGURES | {"colour_acc"}
    steps = 2  # QUICK_SAMPLES: 2 sampling steps
    assert read_rank_records(one, "forwards", ranks=1) == [[5 * steps]]
    # The same forward passes on both ranks, padding included.
    assert read_rank_records(two, "forwards") == [[3 * steps]] * 2
    grids = [run / "images" / "samples_step000002.png" for run in (one, two)]
    assert np.abs(grid_pixels(grids[0]) - grid_pixels(grids[1])).max() <= 1
    captions = val_captions(tiny_shards, 5)
    assert grids[1].with_suffix(".txt").read_text().splitlines() == captions
    exported = json.loads((two / "export" / "ldm_train_pipeline.json").read_text())
    assert exported["prompts"] == captions
