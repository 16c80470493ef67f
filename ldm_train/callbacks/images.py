"""Image grids to whichever logger a run has: W&B, TensorBoard, else a PNG under the run directory.

A stage calls these from its own hooks (e.g. the VAE's inputs above their reconstructions at the
end of every validation; the U-Net's samples, a row per prompt with the prompt as its caption), so
no callback needs registering in the config.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from torchvision.utils import make_grid, save_image

log = logging.getLogger(__name__)


def image_grid(
    rows: Sequence[torch.Tensor],
    max_columns: int = 8,
    value_range: tuple[float, float] = (-1.0, 1.0),
) -> torch.Tensor:
    """Batches of B x C x H x W images -> one 3 x H' x W' grid in [0, 1], one batch per row
    (the first max_columns images of each), e.g. inputs above their reconstructions."""
    columns = min(max_columns, *(len(row) for row in rows))
    images = torch.cat([row[:columns].detach().float().cpu() for row in rows])
    low, high = value_range
    images = ((images - low) / (high - low)).clamp(0, 1)
    return make_grid(images, nrow=columns, padding=2, pad_value=1.0)


def log_image(trainer: L.Trainer, name: str, grid: torch.Tensor) -> list[str]:
    """Log a 3 x H x W image in [0, 1] as images/<name> at the trainer's global step, on rank 0.

    W&B gets log_image and TensorBoard add_image; with neither (CSV logger, no logger) the image
    is saved as <run dir>/images/<name>_step<step>.png. Returns where it went (for messages/tests).
    """
    if not trainer.is_global_zero or trainer.sanity_checking:
        return []
    key, step = f"images/{name}", trainer.global_step
    where = []
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key=key, images=[grid], step=step)
            where.append("wandb")
        elif isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(key, grid, global_step=step)
            where.append("tensorboard")
    if not where:
        where.append(str(save_png(trainer, name, grid)))
    return where


def log_image_rows(
    trainer: L.Trainer,
    name: str,
    rows: Sequence[torch.Tensor],
    captions: Sequence[str],
    value_range: tuple[float, float] = (-1.0, 1.0),
) -> list[str]:
    """Rows of images with a caption each (e.g. a prompt's samples) as images/<name>, on rank 0:
    W&B gets one image per row with its caption; TensorBoard the grid, and the captions as text
    (images/<name>/captions); with neither, the grid's PNG (as log_image) and beside it a .txt with
    one caption per line, in row order. Returns where they went."""
    if len(rows) != len(captions):
        raise ValueError(f"{len(rows)} rows but {len(captions)} captions")
    if not trainer.is_global_zero or trainer.sanity_checking:
        return []
    key, step = f"images/{name}", trainer.global_step
    columns = max(len(row) for row in rows)
    grid = image_grid(rows, max_columns=columns, value_range=value_range)
    lines = [" ".join(caption.split()) for caption in captions]  # one line each
    where = []
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            images = [image_grid([row], columns, value_range) for row in rows]
            logger.log_image(key=key, images=images, step=step, caption=lines)
            where.append("wandb")
        elif isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(key, grid, global_step=step)
            text = "\n".join(f"{row}. {line}  " for row, line in enumerate(lines, 1))
            logger.experiment.add_text(f"{key}/captions", text, global_step=step)
            where.append("tensorboard")
    if not where:
        path = save_png(trainer, name, grid)
        path.with_suffix(".txt").write_text("".join(f"{line}\n" for line in lines))
        where.append(str(path))
    return where


def save_png(trainer: L.Trainer, name: str, grid: torch.Tensor) -> Path:
    """<run dir>/images/<name>_step<step>.png."""
    path = Path(trainer.default_root_dir) / "images" / f"{name}_step{trainer.global_step:06d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(grid, path)
    return path
