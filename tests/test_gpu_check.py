"""`make gpu-check` (benchmarks/gpu.py): its dry mode runs the same code on the CPU, with tiny
presets and a few steps, so that the check cannot rot before a GPU runs it."""

from __future__ import annotations

import io
import json
import queue
import time

import pytest
import torch

from benchmarks import gpu
from benchmarks.gpu import main
from benchmarks.gpu_measure import ROWS, peak_flops
from benchmarks.gpu_smoke import reason, shared_overrides, smokes
from ldm_train.config import check_overrides, compose_config
from ldm_train.train import validate

# The smoke run the dry run below makes: the torchrun "nodes" path, the only one of the smokes'
# launchers that the other smokes do not share. The others run the same code with other overrides
# (trainer=fsdp, bf16, a resume), which test_every_smoke_run_composes_a_valid_config checks without
# training; `make gpu-check ARGS=--dry` runs them all. Those paths train in tests/test_distributed.py
# (FSDP on 1 and 2 processes), tests/test_perf_switches.py (bf16) and tests/test_resume.py.
DRY_SMOKE = "ddp-gloo"


@pytest.mark.slow
def test_the_dry_run_measures_every_row_and_runs_a_smoke_run(tmp_path, run_cli):
    work = tmp_path / "work"
    args = ["-m", "benchmarks.gpu", "--dry", "--work", str(work), "--smokes", DRY_SMOKE]
    # Generous: the CPU is slow at this and shared; on a GPU the default budget is 300 s.
    result = run_cli([*args, "--budget", "1500", "--smoke-time", "900"], tmp_path, False, 1600)
    output = result.stdout + result.stderr
    summary = json.loads((work / "gpu-check.json").read_text())
    assert set(summary["results"]) == set(ROWS)
    for name, row in summary["results"].items():
        assert row["status"] == "ok", (name, row, output[-3000:])
        assert row["images_per_s"] > 0
        if name.startswith("unet"):  # the U-Net's FLOPs were counted, so MFU can be on a GPU
            assert row["tflops"] > 0 and row["vs_mosaic"] > 0
    assert set(summary["smokes"]) == {DRY_SMOKE}
    assert summary["smokes"][DRY_SMOKE]["status"] == "ok", (summary, output[-3000:])
    assert "| U-Net tiny 32 px, cached latents, bf16, foreach AdamW |" in result.stdout
    assert "| DDP, 2 processes on one device, gloo | | | | | ok: 2 steps" in result.stdout
    assert "latent cache speed-up here" in result.stdout


@pytest.mark.parametrize("cuda", [False, True], ids=["dry", "gpu"])
def test_every_smoke_run_composes_a_valid_config(tmp_path, monkeypatch, cuda):
    if cuda:  # validate counts the GPUs the run asks for: one is there
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    upstream = {"vae": tmp_path / "vae", "clip": tmp_path / "clip"}
    for smoke in smokes(cuda):
        shared = shared_overrides(smoke, tmp_path, tmp_path / "data", upstream)
        for overrides in smoke.runs:
            argv = [*shared, *overrides]
            check_overrides(argv)
            validate(compose_config(argv))


def test_an_unknown_smoke_run_lists_the_valid_ones(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--dry", "--work", str(tmp_path), "--smokes", "ddp-gloo,ddp-mpi"])
    assert "unknown smokes ['ddp-mpi']; choose from ddp-nccl, ddp-gloo" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here")
def test_without_cuda_the_real_check_says_to_use_the_dry_mode(tmp_path, capsys):
    assert main(["--work", str(tmp_path)]) == 2
    assert "--dry" in capsys.readouterr().out


@pytest.mark.parametrize(
    "name, peak",
    [
        ("NVIDIA H200", 989.4e12),
        ("NVIDIA H100 80GB HBM3", 989.4e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H100 NVL", 835e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("Tesla T4", None),
    ],
)
def test_mfu_uses_the_dense_bf16_peak_of_the_gpu(name, peak):
    found = peak_flops(name)
    assert (found[1] if found else None) == peak


def test_a_failed_run_is_summed_up_by_its_cause_not_its_consequences():
    output = "\n".join(
        [
            "RuntimeError: mat2 must be a matrix, got 1-D tensor",
            "RuntimeError: [pair.cc:561] Connection closed by peer [127.0.0.1]:12719",
            "torch.distributed.elastic.multiprocessing.errors.ChildFailedError:",
        ]
    )
    assert reason(output) == "RuntimeError: mat2 must be a matrix, got 1-D tensor"
    nccl = "ncclInvalidUsage ...\nLast error:\nDuplicate GPU detected : rank 1 and rank 0 both on CUDA device 1000"
    assert reason(nccl).startswith("Duplicate GPU detected : rank 1 and rank 0")


def reported(*lines: str | None) -> queue.Queue:
    """What a measuring child has printed so far (None: it has exited)."""
    printed: queue.Queue = queue.Queue()
    for line in lines:
        printed.put(line)
    return printed


def test_a_row_that_hangs_crashes_or_overruns_the_budget_becomes_one_failed_row(monkeypatch):
    done = '@@row {"name": "vae", "status": "ok", "images_per_s": 5.0}\n'
    log = io.StringIO()
    soon = time.monotonic() + 0.3
    results = gpu.follow_child(reported("@@start vae\n", done, "@@start clip\n"), [], soon, log)
    assert results["vae"]["status"] == "ok"
    assert results["clip"]["note"].startswith("cut off by the --budget")
    monkeypatch.setattr(gpu, "DEFAULT_ROW_TIMEOUT", 0.2)
    later = time.monotonic() + 60
    hung = gpu.follow_child(reported("Lightning says hi\n", "@@start clip\n"), [], later, log)
    assert hung["clip"]["note"].startswith("timed out after")
    crashed = gpu.follow_child(reported("@@start clip\n", None), ["clip"], later, log)
    assert crashed["clip"]["note"].startswith("its process died")
    died_at_start = gpu.follow_child(reported(None), ["vae", "clip"], later, log)
    assert list(died_at_start) == ["vae"]
    assert log.getvalue() == "Lightning says hi\n"
