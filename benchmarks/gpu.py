"""python -m benchmarks.gpu [--dry] [--budget S] [--work DIR] (make gpu-check): one command that
checks a GPU machine for this project within --budget seconds (default 300) and prints one table.

Measured (benchmarks/gpu_measure.py: the stages from the real config, trainer.fit on synthetic
batches): the sd15 U-Net at 256 px (32x32 latents) from cached latents in bf16, images/s and model
FLOP utilisation, with one more switch per row (fused AdamW, channels_last, torch.compile), and its
ratio to MosaicML's ~137 images/s per A100; the same U-Net encoding images with the SD VAE and a
ViT-L/14-sized text tower at every step (the latent cache's speed-up is the ratio); the SD VAE at
256 px and CLIP ViT-B-32 at 224 px, images/s; the peak GPU memory of each. Then the smoke runs
(benchmarks/gpu_smoke.py): DDP with 2 processes on the one GPU over NCCL and gloo, trainer=fsdp on
1 and 2 processes, a bf16 run that checkpoints, resumes and exports.

Every measurement runs in a child process that reports row by row, so a row that fails, hangs or
crashes CUDA becomes one line of the table (the child is restarted for the rest), and a row that
would not end within the budget is cut off. --dry runs all of it on the CPU with tiny presets and
a few steps (tests/test_gpu_check.py), so it cannot rot before a GPU is at hand.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.gpu_measure import DRY, GPU, MOSAIC_PER_A100, ROWS, RUN_ORDER, row_title
from benchmarks.gpu_smoke import SMOKE_NAMES, child_env, run_smokes

ROW_TIMEOUT = {"unet-foreach": 240, "unet-compile": 300}  # the first builds the sd15 U-Net
DEFAULT_ROW_TIMEOUT = 120


def child_main(rows: list[str], work: Path, dry: bool) -> None:
    """In the child: measure the rows in order, one line `@@row {json}` each; exit after a failure
    (a broken CUDA context would spoil the rest: the parent starts a fresh child)."""
    from benchmarks.gpu_measure import Measure

    measure = Measure(DRY if dry else GPU, work)
    for name in rows:
        print(f"@@start {name}", flush=True)
        started = time.monotonic()
        try:
            row = {"status": "ok", **ROWS[name][1](measure)}
        except Exception as error:
            first_line = (str(error).strip().splitlines() or [""])[0]
            row = {"status": "failed", "note": f"{type(error).__name__}: {first_line}"[:160]}
        row["seconds"] = round(time.monotonic() - started, 1)
        print("@@row " + json.dumps({"name": name, **row}), flush=True)
        if row["status"] != "ok":
            sys.exit(1)


def start_child(
    rows: list[str], work: Path, dry: bool, log
) -> tuple[subprocess.Popen, queue.Queue]:
    argv = [sys.executable, "-m", "benchmarks.gpu", "--child", ",".join(rows), "--work", str(work)]
    process = subprocess.Popen(
        argv + (["--dry"] if dry else []),
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
        start_new_session=True,
    )
    lines: queue.Queue = queue.Queue()

    def read() -> None:  # a thread, so that the parent can wait for a line with a timeout
        for line in process.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    return process, lines


def measure_rows(rows: list[str], work: Path, dry: bool, deadline: float) -> dict[str, dict]:
    """Each row's result; a row that fails, crashes or overruns its time is reported as such."""
    results: dict[str, dict] = {}
    with open(work / "logs" / "measure.log", "a") as log:
        while todo := [r for r in rows if r not in results]:
            if deadline - time.monotonic() < 10:
                results |= {r: {"status": "skipped", "note": "over the --budget"} for r in todo}
                break
            process, lines = start_child(todo, work, dry, log)
            results |= follow_child(lines, todo, deadline, log)
            if process.poll() is None:  # cut off: with whatever it started
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return results


def follow_child(lines: queue.Queue, todo: list[str], deadline: float, log) -> dict:
    """The rows one child reports until it ends, fails or a row overruns its time."""
    results, current, started, row_end = {}, None, time.monotonic(), deadline
    while True:
        try:
            line = lines.get(timeout=max(0.1, row_end - time.monotonic()))
        except queue.Empty:
            cut = "cut off by the --budget" if row_end >= deadline else "timed out"
            note = f"{cut} after {time.monotonic() - started:.0f} s"
            results[current or todo[0]] = {"status": "failed", "note": note}
            return results
        if line is None:  # the child ended: the row it was on crashed it
            failed = current or (todo[0] if not results else None)
            if failed:
                results[failed] = {
                    "status": "failed",
                    "note": "its process died (logs/measure.log)",
                }
            return results
        if line.startswith("@@start "):
            current, started = line.split()[1], time.monotonic()
            row_end = min(started + ROW_TIMEOUT.get(current, DEFAULT_ROW_TIMEOUT), deadline)
        elif line.startswith("@@row "):
            row = json.loads(line[len("@@row ") :])
            name = row.pop("name")
            results[name], current, row_end = row, None, deadline
            rate = cell(row.get("images_per_s"), ".1f", " images/s")
            print(f"  {name}: {row['status']} {rate} {row.get('note', '')}", flush=True)
        else:
            log.write(line)


def cell(value: float | None, spec: str, unit: str = "") -> str:
    return "" if value is None else format(value, spec) + unit


def table(results: dict[str, dict], smokes, preset) -> str:
    lines = [
        "| check | images/s | MFU | vs MosaicML per A100 | peak GPU memory | result |",
        "|---|---|---|---|---|---|",
    ]
    for name in (name for name in ROWS if name in results):
        row = results[name]
        cells = [
            row_title(name, preset),
            cell(row.get("images_per_s"), ".1f"),
            cell(row.get("mfu"), ".1%"),
            cell(row.get("vs_mosaic"), ".2f", "x"),
            cell(row.get("peak_gib"), ".1f", " GiB"),
            f"{row['status']} {row.get('note', '')}".strip(),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    for smoke in smokes:
        lines.append(
            f"| {smoke.title} | | | | | {smoke.result['status']}: {smoke.result['note']} |"
        )
    return "\n".join(lines)


def notes(results: dict[str, dict]) -> list[str]:
    out = [
        f"vs MosaicML: images/s / {MOSAIC_PER_A100:.0f} (SD 2's U-Net at 256 px from cached "
        "latents, ~1,100 images/s on 8 A100s)"
    ]
    peaks = {row["peak"] for row in results.values() if row.get("peak")}
    flops = ", ".join(sorted(peaks)) or "no peak known for this device (MFU left out)"
    out.append(
        f"MFU: the net's forward+backward FLOPs (denoiser.training_flops) x steps/s / {flops}"
    )
    cached = results.get("unet-channels-last", {}).get("images_per_s")
    encoded = results.get("unet-images", {}).get("images_per_s")
    if cached and encoded:
        out.append(f"latent cache speed-up here: {cached / encoded:.2f}x (cached / from images)")
    return out


def device_line(dry: bool) -> str:
    import torch

    if dry:
        return f"dry run on the CPU (tiny presets), torch {torch.__version__}"
    try:
        import torch.cuda.nccl

        version = torch.cuda.nccl.version()
        nccl = ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
    except Exception:  # a build without NCCL: the NCCL rows will say what fails
        nccl = "none"
    name, cuda = torch.cuda.get_device_name(), torch.version.cuda
    return f"{name}, torch {torch.__version__}, CUDA {cuda}, NCCL {nccl}"


def run(
    dry: bool,
    budget: float,
    smoke_time: float,
    work: Path,
    rows: list[str],
    smoke_names: list[str] | None = None,
) -> int:
    """The measurements, then the smoke runs named (None: all; smoke_time 0: none); the table; 0
    if all passed."""
    import torch

    if not dry and not torch.cuda.is_available():
        print(
            "gpu-check: no CUDA device here; `python -m benchmarks.gpu --dry` rehearses on the CPU"
        )
        return 2
    started = time.monotonic()
    deadline = started + budget
    (work / "logs").mkdir(parents=True, exist_ok=True)
    print(f"gpu-check: {device_line(dry)}; work folder {work}", flush=True)
    results = measure_rows(rows, work, dry, deadline - smoke_time)
    cuda = torch.cuda.is_available() and not dry
    smokes = (
        run_smokes(cuda, work, deadline - time.monotonic(), smoke_names) if smoke_time > 0 else []
    )
    report = "\n".join([table(results, smokes, DRY if dry else GPU), "", *notes(results)])
    print(report + f"\n({time.monotonic() - started:.0f} s)")
    summary = {"results": results, "smokes": {s.name: s.result for s in smokes}}
    (work / "gpu-check.json").write_text(json.dumps(summary, indent=2))
    statuses = [r["status"] for r in results.values()] + [s.result["status"] for s in smokes]
    return 0 if all(s in ("ok", "skipped") for s in statuses) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--dry", action="store_true", help="on the CPU, tiny presets, a few steps")
    parser.add_argument("--budget", type=float, default=300, help="seconds for everything")
    parser.add_argument(
        "--smoke-time",
        type=float,
        default=100,
        help="seconds of the budget kept for the smoke runs (0: no smoke runs)",
    )
    parser.add_argument(
        "--work", type=Path, help="folder for parts, data, logs (default: a temp one)"
    )
    parser.add_argument(
        "--rows", help=f"comma-separated measurements (default all: {','.join(RUN_ORDER)})"
    )
    parser.add_argument(
        "--smokes",
        help=f"comma-separated smoke runs (default all: {','.join(SMOKE_NAMES)})",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu-check-"))
    if args.child:
        child_main(args.child.split(","), work, args.dry)
        return 0
    rows = args.rows.split(",") if args.rows else RUN_ORDER
    smoke_names = args.smokes.split(",") if args.smokes else None
    for kind, asked, known in (("rows", rows, ROWS), ("smokes", smoke_names or [], SMOKE_NAMES)):
        if unknown := set(asked) - set(known):
            parser.error(f"unknown {kind} {sorted(unknown)}; choose from {', '.join(known)}")
    return run(args.dry, args.budget, args.smoke_time, work, rows, smoke_names)


if __name__ == "__main__":
    sys.exit(main())
