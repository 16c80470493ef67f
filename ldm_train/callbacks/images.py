"""Image grids to whichever logger a run has: W&B, TensorBoard, else a PNG under the run directory.

A stage calls these from its own hooks (e.g. the VAE's inputs above their reconstructions at the
end of every validation; the U-Net's samples), so no callback needs registering in the config.
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
        path = Path(trainer.default_root_dir) / "images" / f"{name}_step{step:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image(grid, path)
        where.append(str(path))
    return where
