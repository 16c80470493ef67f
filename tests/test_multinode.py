"""A multi-node rehearsal on one machine: two torchrun "nodes" (`torchrun --nnodes=2
--nproc_per_node=1 --node_rank=0|1`, rendezvous on 127.0.0.1, gloo) train stage=unet as one job,
as the README's multi-node command does on a cluster. Lightning takes the ranks from torchrun's
environment (TorchElasticEnvironment: RANK, LOCAL_RANK, GROUP_RANK, WORLD_SIZE); the nodes read
disjoint shards, share one run directory, write one checkpoint and one export; then one node, one
process, resumes the run."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from test_ddp import KeyRecorder, read_rank_records

pytestmark = pytest.mark.slow

PIXEL_UNET = ["stage=unet", "stage.vae=null", "stage.text_encoder=null"]
NODE = [  # what each node runs: one process, one "device", of 2 nodes
    "trainer=ddp",
    "trainer.accelerator=cpu",
    "trainer.devices=1",
    "trainer.num_nodes=2",
    "trainer.precision=32-true",
]


class RankRecorder(KeyRecorder):
    """Writes <run_dir>/placement-rank<N>.json: where Lightning placed this process, and its sample
    keys."""

    name = "placement"

    def record(self, trainer: L.Trainer) -> dict:
        return {
            "environment": type(trainer.strategy.cluster_environment).__name__,
            "global_rank": trainer.global_rank,
            "node_rank": trainer.node_rank,
            "local_rank": trainer.local_rank,
            "world_size": trainer.world_size,
            "run_dir": trainer.default_root_dir,
            "keys": self.keys,
        }


def test_two_nodes_train_one_run_and_one_node_resumes(
    tmp_path, tiny_overrides, free_port, run_together, run_cli
):
    stage = [
        "-m",
        "ldm_train",
        *tiny_overrides(tmp_path / "outputs"),
        *PIXEL_UNET,
        "stage.module.validation.samples_per_prompt=0",
        "data.batches_per_epoch=2",
        "trainer.limit_val_batches=1",
    ]
    recorder = f"+callbacks.ranks={{_target_:{__name__}.RankRecorder}}"
    rendezvous = ["--nnodes=2", "--nproc_per_node=1", "--master_addr=127.0.0.1"]
    port = f"--master_port={free_port()}"
    nodes = [
        (["-m", "torch.distributed.run", *rendezvous, port, f"--node_rank={node}"], {})
        for node in (0, 1)
    ]
    nodes = [
        ([*launcher, *stage, *NODE, recorder, "trainer.max_steps=2"], env)
        for launcher, env in nodes
    ]
    for code, output in run_together(nodes, tmp_path, timeout=400):
        assert code == 0, output[-4000:]

    run_dir = tmp_path / "outputs" / "shapes" / "unet"
    assert [p.name for p in run_dir.parent.iterdir()] == ["unet"]  # one run directory
    records = read_rank_records(run_dir, "placement")
    for rank, record in enumerate(records):
        assert record["environment"] == "TorchElasticEnvironment"
        assert (record["global_rank"], record["node_rank"], record["local_rank"]) == (rank, rank, 0)
        assert record["world_size"] == 2 and record["run_dir"] == str(run_dir)
        assert len(record["keys"]) == 2 * 8  # 2 steps of 8 samples
    assert not set(records[0]["keys"]) & set(records[1]["keys"])  # each node its own shards
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 2
    assert (run_dir / "export" / "unet").is_dir()

    # One node, one process, without torchrun: the run goes on from its checkpoint.
    result = run_cli([*stage, "trainer.max_steps=3"], tmp_path)
    assert (
        f"continuing from {run_dir / 'checkpoints' / 'last.ckpt'}" in result.stdout + result.stderr
    )
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3
