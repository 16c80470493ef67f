"""The smoke runs of `make gpu-check` (benchmarks/gpu.py): the real CLI, `python -m ldm_train
stage=unet`, on the embedded shapes data with tiny presets (a tiny VAE and CLIP, validation samples
on), a few steps each, to see that the multi-process paths run at all: DDP with two processes on
the one GPU (two torchrun "nodes" of one process each, so that both use cuda:0) over NCCL and over
gloo, trainer=fsdp on one process and on two, and a bf16 run that checkpoints, resumes and exports.
In the dry mode the same runs go on the CPU (gloo; trainer=fsdp through CpuFSDPStrategy) and the
NCCL one is skipped. All of them run at once (they are checks, not measurements)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from ldm_train.data.shards import shard_path, shard_urls

REPO = Path(__file__).resolve().parents[1]
FIRST_STEPS, RESUMED_STEPS = 2, 3
GLOO_DDP = (
    "trainer.strategy={_target_:lightning.pytorch.strategies.DDPStrategy,"
    "process_group_backend:gloo}"
)
TWO_NODES = ["trainer.devices=1", "trainer.num_nodes=2"]
# One export loaded at a time: the smokes run in threads, and diffusers' from_pretrained builds
# models under accelerate's init_empty_weights, which patches torch.nn.Module for every thread (a
# model another thread builds meanwhile gets weights on the meta device: "Cannot copy out of meta
# tensor").
LOADING = threading.Lock()


@dataclass
class Smoke:
    name: str
    title: str
    runs: list[list[str]]  # each CLI run's overrides, in order (after the shared ones)
    nodes: int = 1  # 2: every run as two torchrun "nodes" of one process
    needs_cuda: bool = False
    result: dict = field(default_factory=dict)

    @property
    def resumes(self) -> bool:
        return len(self.runs) > 1


def smokes(cuda: bool) -> list[Smoke]:
    """The runs. Two processes on one GPU: NCCL may refuse it ("Duplicate GPU detected"), so each
    two-process run also goes over gloo (which takes CUDA tensors too)."""
    device = ["trainer.accelerator=gpu" if cuda else "trainer.accelerator=cpu"]
    bf16 = [*device, "trainer.precision=bf16-mixed"]
    fsdp = ["trainer=fsdp", "model.ema_decay=null", *device]
    if not cuda:  # Lightning's FSDP on the CPU, in float32 (gloo sums no bf16)
        cpu_fsdp = "trainer.strategy._target_=ldm_train.distributed.CpuFSDPStrategy"
        fsdp += [cpu_fsdp, "trainer.precision=32-true"]
    ddp = ["trainer=ddp", *TWO_NODES, *device]
    fsdp_2 = [*fsdp, *TWO_NODES]
    # The FSDP checkpoint resumed without FSDP on one GPU. Not on the CPU, where torch's FSDP1
    # writes optimizer states that alias one buffer (tests/test_distributed.py).
    fsdp_resume = [["model.ema_decay=null", *bf16, f"trainer.max_steps={RESUMED_STEPS}"]]
    return [
        Smoke("ddp-nccl", "DDP, 2 processes on one GPU, NCCL", [ddp], 2, True),
        Smoke("ddp-gloo", "DDP, 2 processes on one device, gloo", [[*ddp, GLOO_DDP]], 2),
        Smoke(
            "fsdp-1",
            "trainer=fsdp, 1 process" + (", then resumed without FSDP" if cuda else ""),
            [[*fsdp, "trainer.devices=1"], *(fsdp_resume if cuda else [])],
        ),
        Smoke("fsdp-2-nccl", "trainer=fsdp, 2 processes on one GPU, NCCL", [fsdp_2], 2, True),
        Smoke(
            "fsdp-2-gloo",
            "trainer=fsdp, 2 processes on one device, gloo",
            [[*fsdp_2, "+trainer.strategy.process_group_backend=gloo"]],
            2,
        ),
        Smoke(
            "bf16-resume",
            "bf16 run: checkpoint, resume, export",
            [bf16, [*bf16, f"trainer.max_steps={RESUMED_STEPS}"]],
        ),
    ]


SMOKE_NAMES = [smoke.name for smoke in smokes(cuda=True)]


def shared_overrides(smoke: Smoke, work: Path, data: Path, upstream: dict[str, Path]) -> list[str]:
    return [
        "stage=unet",
        f"experiment_name=smoke-{smoke.name}",
        f"paths.output_root={work / 'smoke'}",
        f"paths.data_dir={work / 'data'}",
        f"data.train_urls='{shard_urls(data, 'train', 4)}'",
        f"data.val_urls='{shard_urls(data, 'val', 2)}'",
        "data.make_dataset=null",
        "data.num_workers=0",
        "data.batch_size=8",
        f"data.batches_per_epoch={FIRST_STEPS}",
        "data.shuffle_buffer=32",
        "logger=csv",
        f"trainer.max_steps={FIRST_STEPS}",
        "checkpoint_every_n_steps=1",
        "trainer.limit_val_batches=1",
        "trainer.enable_progress_bar=false",
        f"stage.vae={upstream['vae']}",
        f"stage.text_encoder={upstream['clip']}",
        "stage.module.validation.samples_per_prompt=1",
        "stage.module.validation.sampling.steps=2",
    ]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def commands(smoke: Smoke, overrides: list[str]) -> list[list[str]]:
    """`python -m ldm_train ...`, or one torchrun per "node" (localhost, one process each)."""
    if smoke.nodes == 1:
        return [[sys.executable, "-m", "ldm_train", *overrides]]
    port = free_port()
    return [
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nnodes={smoke.nodes}",
            "--nproc_per_node=1",
            f"--node_rank={node}",
            "--master_addr=127.0.0.1",
            f"--master_port={port}",
            "-m",
            "ldm_train",
            *overrides,
        ]
        for node in range(smoke.nodes)
    ]


def child_env(threads: int | None = None) -> dict[str, str]:
    """This checkout first on the path, W&B offline; `threads` torch threads (None: torch's)."""
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true")
    if threads:  # several processes at once must not each take every core
        env["OMP_NUM_THREADS"] = str(threads)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def run_together(argvs: list[list[str]], log: Path, timeout: float) -> tuple[bool, str]:
    """Every command at once; (all exited 0, their output). On a timeout all are killed with
    their children (torchrun's workers)."""
    processes = [
        subprocess.Popen(
            argv,
            cwd=log.parent,
            env=child_env(threads=2),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        for argv in argvs
    ]
    deadline, outputs, timed_out = time.monotonic() + timeout, [], False
    for process in processes:
        try:
            outputs.append(process.communicate(timeout=max(1, deadline - time.monotonic()))[0])
        except subprocess.TimeoutExpired:
            timed_out = True
            for other in processes:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(other.pid, signal.SIGKILL)
            outputs.append(process.communicate()[0])
    output = "\n".join(outputs)
    log.write_text(output)
    if timed_out:
        return False, f"timed out after {timeout:.0f} s\n{output}"
    return all(p.returncode == 0 for p in processes), output


# What a failed run's output says about why, before the errors that follow from it (a rank's
# peer crashed, torchrun's summary).
WHY = (r"Duplicate GPU detected.*", r"ldm_train: error: .*", r"^timed out after .*")
CONSEQUENCES = ("ChildFailedError", "Connection closed by peer", "Connection reset by peer")


def reason(output: str) -> str:
    """The line of a failed run's output that says why (one line for the table)."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for pattern in WHY:
        for line in lines:
            if found := re.search(pattern, line):
                return found.group(0)[:160]
    errors = [
        line for line in lines if re.match(r"^(\[rank\d+\]:\s*)?[\w.]*(Error|Exception): ", line)
    ]
    causes = [line for line in errors if not any(c in line for c in CONSEQUENCES)]
    return (causes or errors or lines or ["no output"])[0][:160]


def run_smoke(smoke: Smoke, shared: list[str], logs: Path, timeout: float) -> dict:
    """The smoke's runs in order, then what they should have left: a last checkpoint at the last
    run's step, an export that loads and draws an image, and the resumed run's notice."""
    import torch

    from ldm_train.diffusion.pipeline import Pipeline
    from ldm_train.diffusion.sampler import SamplingOptions

    started = time.monotonic()
    deadline = started + timeout
    for i, overrides in enumerate(smoke.runs):
        log = logs / f"smoke-{smoke.name}-{i}.log"
        remaining = deadline - time.monotonic()
        ok, output = run_together(commands(smoke, [*shared, *overrides]), log, remaining)
        if not ok:
            return {"status": "failed", "note": f"{reason(output)} (log: {log})"}
    run_dir = Path(next(o.split("=", 1)[1] for o in shared if o.startswith("paths.output_root=")))
    run_dir = run_dir / f"smoke-{smoke.name}" / "unet"
    steps = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    expected = RESUMED_STEPS if smoke.resumes else FIRST_STEPS
    if steps != expected or (smoke.resumes and "continuing from" not in output):
        return {"status": "failed", "note": f"last.ckpt at step {steps}, expected {expected}"}
    with LOADING:
        image = Pipeline.load(run_dir / "export").generate(
            ["a red circle"], 1, SamplingOptions(steps=2)
        )
    resumed = f", resumed to {steps}" if smoke.resumes else ""
    note = f"{FIRST_STEPS} steps{resumed}, export draws {tuple(image.shape)}"
    return {"status": "ok", "note": note, "seconds": round(time.monotonic() - started, 1)}


def run_smokes(
    cuda: bool, work: Path, timeout: float, names: list[str] | None = None
) -> list[Smoke]:
    """The smoke runs named (None: all) at once, each within `timeout` seconds; results in
    smoke.result."""
    from benchmarks.common import write_upstream
    from ldm_train.data.shapes import make_shapes_dataset

    data = work / "data" / "shapes-32"
    if not shard_path(data, "val", 1).is_file():
        make_shapes_dataset(
            data, image_size=32, n_train=256, n_val=64, train_shards=4, val_shards=2, progress=False
        )
    upstream = write_upstream(work / "smoke-parts")
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    todo = [smoke for smoke in smokes(cuda) if names is None or smoke.name in names]
    for smoke in todo:
        if smoke.needs_cuda and not cuda:
            smoke.result = {
                "status": "skipped",
                "note": "needs CUDA (the dry mode runs on the CPU)",
            }
    with ThreadPoolExecutor(max_workers=len(todo)) as pool:
        futures = {
            smoke.name: pool.submit(
                run_smoke, smoke, shared_overrides(smoke, work, data, upstream), logs, timeout
            )
            for smoke in todo
            if not smoke.result
        }
    for smoke in todo:
        if smoke.name in futures:
            try:
                smoke.result = futures[smoke.name].result()
            except Exception as error:  # a check that could not even look: one row, not an abort
                smoke.result = {
                    "status": "failed",
                    "note": f"{type(error).__name__}: {error}"[:160],
                }
    return todo
