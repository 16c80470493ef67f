"""Counts the samples the loader skipped (corrupt shards, undecodable images, missing captions)."""

from __future__ import annotations

from typing import Any

import lightning as L


class DataHealthMonitor(L.Callback):
    """Adds up `batch["skipped"]` and logs the running total as data/skipped (summed over ranks,
    shown in the progress bar). The total is kept in checkpoints, so a resumed run goes on counting.

    With aspect-ratio buckets it also logs how full each bucket is: data/bucket_<w>x<h>, the
    samples the reader that made the batch holds there (rank 0's: without a collective, since
    ranks need not have met the same shapes yet), and data/bucket_moved, the samples moved to
    another bucket at data.bucket_cap (summed over ranks, kept in checkpoints)."""

    def __init__(self) -> None:
        self.skipped = 0
        self.moved = 0

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self._count(batch)
        if isinstance(batch, dict) and "bucket_fill" in batch:
            self._log_buckets(pl_module, batch)
        pl_module.log(
            "data/skipped",
            float(self.skipped),
            prog_bar=True,
            on_step=True,
            on_epoch=False,
            reduce_fx="sum",
            sync_dist=True,
            batch_size=1,
        )

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._count(batch)  # shows up in the next training step's data/skipped

    def _count(self, batch: Any) -> None:
        if isinstance(batch, dict):
            self.skipped += int(batch.get("skipped", 0))

    def _log_buckets(self, pl_module: L.LightningModule, batch: dict) -> None:
        for name, held in batch["bucket_fill"].items():
            pl_module.log(
                f"data/bucket_{name}", float(held), on_step=True, on_epoch=False, batch_size=1
            )
        self.moved += int(batch["bucket_moved"])
        pl_module.log(
            "data/bucket_moved",
            float(self.moved),
            on_step=True,
            on_epoch=False,
            reduce_fx="sum",
            sync_dist=True,
            batch_size=1,
        )

    def state_dict(self) -> dict[str, int]:
        return {"skipped": self.skipped, "moved": self.moved}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.skipped = state_dict["skipped"]
        self.moved = state_dict.get("moved", 0)


def batch_size(batch: dict) -> int:
    """Samples in a loader batch (for Lightning's ThroughputMonitor)."""
    return len(batch["caption"])
