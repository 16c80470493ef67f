"""Preemption signals through the real CLI with 2 loader workers: sent to the whole process group
(as SLURM and `kill -- -PGID` do) they give a checkpoint and exit code 0; a second signal, or one
while no step can finish (a stuck loader), ends the run at once."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

TESTS = Path(__file__).resolve().parent


@pytest.fixture
def start(tmp_path: Path, tiny_shards: dict, start_cli):
    def run(train_urls: str, *extra: str) -> subprocess.Popen:
        """The CLI training test_resume's Recorder (0.15 s a step), 2 loader workers, in a session
        of its own (so that os.killpg reaches it and every process it started, and nothing else)."""
        args = [
            "-m",
            "ldm_train",
            "experiment_name=signals",
            "logger=csv",
            "trainer.accelerator=cpu",
            f"paths.output_root={tmp_path}",
            f"data.train_urls='{train_urls}'",
            f"data.val_urls='{tiny_shards['val_urls']}'",
            "data.make_dataset=null",
            "data.num_workers=2",
            "data.batch_size=8",
            "data.batches_per_epoch=5",
            "trainer.max_steps=40",
            "trainer.enable_progress_bar=false",
            "checkpoint_every_n_steps=2",
            "~stage.module",
            "+stage.module={_target_:test_resume.Recorder,delay:0.15}",
            *extra,
        ]
        return start_cli(args, tmp_path, new_session=True)

    return run


def ended_within(process: subprocess.Popen, seconds: float) -> str:
    """The run's output once its main process has ended (fails if that takes longer); then kills
    what is left of its process group, e.g. the `sleep` of a stuck pipe: shard, which holds the
    output pipe open."""
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=seconds)
    ended = process.poll() is not None
    with contextlib.suppress(ProcessLookupError):  # nothing left
        os.killpg(process.pid, signal.SIGKILL)
    output, _ = process.communicate()
    assert ended, f"still running {seconds} s after the signal: {output[-3000:]}"
    return output


@pytest.mark.parametrize(
    "signum, ranks", [(signal.SIGTERM, 1), (signal.SIGUSR1, 1), (signal.SIGTERM, 2)]
)
def test_signal_to_the_process_group_saves_a_checkpoint_and_exits_0(
    tmp_path, tiny_shards, signum, ranks, start, wait_for
):
    """Loader workers get the signal too, ignore it, and keep serving the step that finishes.
    With 2 DDP ranks (CPU, gloo) every rank gets it; Lightning's own handler, which forwards it
    and broadcasts inside the handler, made the ranks' collectives mismatch and hang."""
    checkpoints = tmp_path / "signals" / "clip" / "checkpoints"
    ddp = [f"trainer.devices={ranks}", "trainer.strategy=ddp"] if ranks > 1 else []
    process = start(tiny_shards["train_urls"], *ddp)
    wait_for(checkpoints / "step00000004.ckpt", process)
    os.killpg(process.pid, signum)  # the main process, both loader workers
    output = ended_within(process, 120)
    assert process.returncode == 0, output[-3000:]
    step = torch.load(checkpoints / "last.ckpt", weights_only=False)["global_step"]
    assert 4 <= step < 40
    assert f"saved {checkpoints / 'last.ckpt'} at step {step}" in output
    assert "killed by signal" not in output and "Traceback" not in output


def stuck_after_first_shard(tiny_shards: dict) -> str:
    """A pipe: shard that streams one good tar, then hangs (as a stalled network read does)."""
    shard = tiny_shards["train_urls"].replace("{000000..000003}", "000000")
    return f"pipe:cat {shard}; sleep 600"


@pytest.mark.parametrize("how", ["no step ends within grace_s", "a second SIGTERM"])
def test_sigterm_while_no_step_can_finish_exits_promptly(
    tmp_path, tiny_shards, how, start, wait_for
):
    """Each worker gets 32 samples (3 whole batches: the tar reader holds the last one back), then waits on the pipe: no step can end. With
    grace_s=2 one SIGTERM exits ~2 s later; with grace_s=600 a second SIGTERM exits at once. The
    newest checkpoint stays for the rerun."""
    grace = 2 if how == "no step ends within grace_s" else 600
    url = stuck_after_first_shard(tiny_shards)
    extra = f"callbacks.preemption.grace_s={grace}", "data.shuffle_buffer=1"  # yield at once
    process = start(url, *extra)
    checkpoints = tmp_path / "signals" / "clip" / "checkpoints"
    wait_for(checkpoints / "step00000006.ckpt", process)  # 6 batches: the loader is dry now
    time.sleep(1.0)
    process.send_signal(signal.SIGTERM)
    if how == "a second SIGTERM":
        time.sleep(1.0)
        assert process.poll() is None  # the first one waits for a step to end
        process.send_signal(signal.SIGTERM)
    started = time.monotonic()
    output = ended_within(process, 30)
    assert time.monotonic() - started < 15
    assert process.returncode == 128 + signal.SIGTERM, output[-3000:]
    assert "exiting without a checkpoint; rerun the command to resume" in output
    step = torch.load(checkpoints / "last.ckpt", weights_only=False)["global_step"]
    assert step == 6


def test_sigterm_before_the_first_step_exits_at_once(tmp_path, start, wait_for):
    """A loader that never delivers: no step ends, nothing new to save; SIGTERM exits at once."""
    ready = tmp_path / "loader-started"
    process = start(f"pipe:touch {ready}; sleep 600")
    wait_for(ready, process)
    process.send_signal(signal.SIGTERM)
    output = ended_within(process, 15)
    assert process.returncode == 128 + signal.SIGTERM, output[-3000:]
    assert "before the first step ended (nothing new to save)" in output
