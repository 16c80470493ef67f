"""Exact resume of the data stream: a run stopped at step k and resumed sees the same batches, in
the same order, as a run that never stopped, and ends with the same weights."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf, open_dict

from ldm_train.train import train


class Recorder(L.LightningModule):
    """A tiny model that remembers the keys of every batch it trained on."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Linear(3, 1)
        self.seen: list[list[str]] = []

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.seen.append(list(batch["key"]))
        return (self.net(batch["image"].mean(dim=(2, 3))) - 1).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=0.01)

    def export(self, out_dir):
        return None


def run(make_cfg, steps: int, workers: int, *extra: str):
    cfg = make_cfg(
        f"trainer.max_steps={steps}",
        f"data.num_workers={workers}",
        "data.batches_per_epoch=5",
        "data.random_flip=true",
        "data.crop=random",
        "data.image_size=28",
        *extra,
    )
    with open_dict(cfg):
        cfg.stage.module = OmegaConf.create({"_target_": f"{__name__}.Recorder"})
    _, objects = train(cfg)
    return objects["module"]


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("stop", [5, 7])  # at an epoch's end, and in the middle of one
def test_resumed_run_sees_the_same_data_and_ends_with_the_same_weights(make_cfg, workers, stop):
    straight = run(make_cfg, 12, workers, "experiment_name=straight")
    first = run(make_cfg, stop, workers, "experiment_name=cut", f"checkpoint_every_n_steps={stop}")
    resumed = run(make_cfg, 12, workers, "experiment_name=cut", "checkpoint_every_n_steps=100")
    assert len(straight.seen) == 12 and len(first.seen) == stop
    assert first.seen + resumed.seen == straight.seen
    for a, b in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
