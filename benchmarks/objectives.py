"""Which objective and which network: the U-Net with epsilon, v-prediction and flow matching, and
the MMDiT (SD3Transformer2DModel) with flow matching, at matched parameter counts (model=unet/demo,
demo_flow: 1.08M; dit_tiny: 1.03M, with the demo's 64-wide text tower), trained side by side as
`make demo`'s chain trains its U-Net (stage=all's unet settings: batch 32, caches, a validation with
fd_clip / clip_score / accuracy every 200 steps, samples in 20 steps, guidance 4).

    python -m benchmarks.objectives [--data shapes shapes_mixed] [--steps 3000] [--root DIR]
        [--upstream EXPERIMENT_DIR]

For each dataset: the CLIP and VAE of the chain (trained once under ROOT/<data>/upstream with the
chain's settings, or taken from --upstream, e.g. outputs/shapes after `make demo`; shapes_mixed
reuses the shapes ones unless given its own), then the four U-Net stages at once, one process each
with one thread, so that they share whatever else runs on the machine; each continues where it
stopped when run again (resume=auto). Then, per variant:
- the validation curve (val/fd_clip, val/clip_score, val/accuracy against steps and training time);
- at equal steps (the last) and at equal time (the validation at or before the shortest run's
  training time);
- the final EMA weights' samples at 10, 20 and 50 sampling steps (each objective's default sampler:
  DDIM for epsilon / v, Euler for flow; guidance 1.5 as the chain checks it; 2 images for each of
  64 validation captions, measured against 256 validation images);
- the network's training step alone at one batch (random latents, the real text encoder): CPU
  seconds per step (the best of 3 runs, variants alternated) and the peak RSS it adds, each in a
  fresh process.
Everything lands in ROOT/<data>/results.json and prints as one table per dataset.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from ldm_train.chain import stage_overrides
from ldm_train.config import compose_config

VARIANTS = {
    "unet-eps": ["model.unet=demo", "model.prediction_type=epsilon"],
    "unet-v": ["model.unet=demo"],
    "unet-flow": ["model.unet=demo_flow"],
    "dit-flow": ["model.unet=dit_tiny"],
}
SAMPLING_STEPS = (10, 20, 50)
CURVE = ("val/fd_clip", "val/clip_score", "val/accuracy")
BATCH = 32


def chain_config(data: str, variant: str = "unet-v"):
    """stage=all's config for the data, with the variant's U-Net preset."""
    model = [o for o in VARIANTS[variant] if o.startswith("model.unet=")]
    return compose_config(["stage=all", f"data={data}", *model])


EXTRA: list[str] = []  # --set: overrides for every run (e.g. trainer.accelerator=gpu)


def common(root: Path, data: str) -> list[str]:
    """What every run of the benchmark shares: its outputs, the data, CSV logs, one thread."""
    return [
        f"data={data}",
        f"paths.output_root={root}",
        "logger=csv",
        "trainer.enable_progress_bar=false",
        *EXTRA,
    ]


def run_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}


def upstream(root: Path, data: str, given: Path | None) -> Path:
    """A folder with the chain's clip and vae run directories: given, already trained under root,
    or trained now."""
    base = given or root / data / "upstream"
    cfg = chain_config(data)
    for stage in ("clip", "vae"):
        if (base / stage / "export").is_dir():
            continue
        if given is not None:
            raise SystemExit(f"--upstream {given}: no {stage}/export in it")
        args = stage_overrides(cfg, stage, [*common(root / data, data), "experiment_name=upstream"])
        print(f"objectives: training the chain's {stage} for {data} (once)", flush=True)
        subprocess.run([sys.executable, "-m", "ldm_train", *args], env=run_env(), check=True)
    return base


def experiment(root: Path, data: str, variant: str, base: Path) -> dict[str, Path]:
    """The variant's experiment folder with copies of the clip and vae runs, laid out as the
    chain leaves them (so that `stage=all` on it continues there); their exports."""
    exports = {}
    for stage in ("clip", "vae"):
        run_dir = root / data / variant / stage
        if not run_dir.is_dir():
            shutil.copytree(base / stage, run_dir)
        exports[stage] = run_dir / "export"
    return exports


def unet_args(root: Path, data: str, variant: str, exports: dict, steps: int) -> list[str]:
    """The chain's unet stage for the variant, as stage=all would run it."""
    user = [
        *common(root / data, data),
        f"experiment_name={variant}",
        f"trainer.max_steps={steps}",
        *[o for o in VARIANTS[variant] if not o.startswith("model.unet=")],
    ]
    return stage_overrides(chain_config(data, variant), "unet", user, exports)


def train_variants(root: Path, data: str, base: Path, steps: int) -> dict[str, Path]:
    """The four U-Net stages at once (each resumes if stopped); their run directories."""
    runs, processes = {}, {}
    for variant in VARIANTS:
        exports = experiment(root, data, variant, base)
        runs[variant] = root / data / variant / "unet"
        log = root / data / f"{variant}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        args = [sys.executable, "-m", "ldm_train", *unet_args(root, data, variant, exports, steps)]
        with log.open("a") as out:
            processes[variant] = subprocess.Popen(args, stdout=out, stderr=out, env=run_env())
    for variant, process in processes.items():
        if process.wait() != 0:
            raise SystemExit(f"objectives: {variant} failed; see {root / data / variant}.log")
    return runs


def read_curve(run_dir: Path) -> list[dict]:
    """Per validation: step, training seconds by then (Lightning's ThroughputMonitor train/time,
    summed over resumed launches) and the metrics."""
    rows: list[dict] = []
    offset = 0.0
    for metrics in sorted(run_dir.glob("csv/version_*/metrics.csv"), key=version_number):
        last_time = 0.0
        with metrics.open() as f:
            for row in csv.DictReader(f):
                if row.get("train/time"):
                    last_time = float(row["train/time"])
                if row.get(CURVE[0]):
                    point = {"step": int(row["step"]), "time": offset + last_time}
                    point |= {key: float(row[key]) for key in CURVE if row.get(key)}
                    rows.append(point)
        offset += last_time
    return rows


def version_number(path: Path) -> int:
    return int(path.parent.name.removeprefix("version_"))


def at_time(curve: list[dict], seconds: float) -> dict:
    """The last validation at or before `seconds` of training."""
    before = [point for point in curve if point["time"] <= seconds * 1.001]
    return before[-1] if before else {}


def evaluate_samples(runs: dict[str, Path]) -> dict[str, dict]:
    """ldm_train.evaluate of each variant's export at each of SAMPLING_STEPS (the export's
    sampler), the variants at once; each once (kept in eval-<steps>/metrics.json)."""
    results: dict[str, dict] = {variant: {} for variant in runs}
    for steps in SAMPLING_STEPS:
        processes = {}
        for variant, run_dir in runs.items():
            out = run_dir / f"eval-{steps}"
            if not (out / "metrics.json").is_file():
                args = [sys.executable, "-m", "ldm_train.evaluate", str(run_dir / "export")]
                args += ["data.prompts=null", "--max-prompts", "64", "--n", "2"]
                args += ["--max-reference", "256", "--guidance", "1.5", "--steps", str(steps)]
                processes[variant] = subprocess.Popen(
                    [*args, "--out", str(out)], env=run_env(), stdout=subprocess.DEVNULL
                )
        for variant, process in processes.items():
            if process.wait() != 0:
                raise SystemExit(f"objectives: evaluating {variant} at {steps} steps failed")
        for variant, run_dir in runs.items():
            figures = json.loads((run_dir / f"eval-{steps}" / "metrics.json").read_text())
            keep = ("fd_clip", "clip_score", "accuracy")
            results[variant][str(steps)] = {k: v for k, v in figures.items() if k in keep}
    return results


def measure_net(args: argparse.Namespace) -> None:
    """In a child process: the variant's denoiser alone, training steps at BATCH on random
    latents; prints one JSON line (CPU s/step, peak RSS added, parameters)."""
    import torch

    from benchmarks.memory import peak_rss_mib
    from ldm_train.train import build

    torch.set_num_threads(1)
    cfg_args = unet_args(args.root, args.data, args.measure, json.loads(args.exports), 10)
    module = build(compose_config(cfg_args).stage.module)
    net, side = module.net, module.latents.side
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
    captions = ["a large red circle in the center on a blue background"] * BATCH
    context = module.context(captions)
    x0 = torch.randn(BATCH, module.latents.channels, side, side)
    generator = torch.Generator().manual_seed(0)
    before, seconds = peak_rss_mib(), []
    for step in range(8):
        started = time.process_time()
        t, noise = module.loss.draw(x0, module.noise_scheduler, generator)
        loss = module.loss(
            module.predictor(context, captions), module.noise_scheduler, x0, t, noise
        )
        loss["mse"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= 2:
            seconds.append(time.process_time() - started)
    params = sum(p.numel() for p in net.parameters())
    result = {"s_per_step": min(seconds), "peak_mib": peak_rss_mib() - before, "params": params}
    print("NET " + json.dumps(result), flush=True)


def measure_nets(root: Path, data: str, base: Path, repeats: int = 3) -> dict[str, dict]:
    """measure_net for each variant, in fresh processes, alternated; the best of `repeats`."""
    best: dict[str, dict] = {}
    for _ in range(repeats):
        for variant in VARIANTS:
            exports = experiment(root, data, variant, base)
            args = [sys.executable, "-m", "benchmarks.objectives", "--measure", variant]
            args += ["--data", data, "--root", str(root), "--set", *EXTRA]
            args += ["--exports", json.dumps({k: str(v) for k, v in exports.items()})]
            output = subprocess.run(args, env=run_env(), capture_output=True, text=True).stdout
            line = next((x for x in output.splitlines() if x.startswith("NET ")), None)
            if line is None:
                continue
            result = json.loads(line[4:])
            kept = best.get(variant)
            if kept is None or result["s_per_step"] < kept["s_per_step"]:
                best[variant] = result | {"peak_mib": max(result["peak_mib"], 0.0)}
    return best


def fmt(point: dict) -> str:
    if not point:
        return "-"
    acc = point.get("val/accuracy", point.get("accuracy"))
    fd = point.get("val/fd_clip", point.get("fd_clip"))
    score = point.get("val/clip_score", point.get("clip_score"))
    text = f"fd {fd:6.1f} cs {score:.3f}"
    return text + (f" acc {acc:.2f}" if acc is not None else "")


def report(data: str, results: dict) -> None:
    print(f"\nobjectives on {data} (OMP_NUM_THREADS=1 each, the four trained at once)")
    for variant, result in results.items():
        curve, net = result["curve"], result.get("net", {})
        last = curve[-1] if curve else {}
        print(
            f"{variant:9s} {net.get('params', 0) / 1e6:.2f}M  step {net.get('s_per_step', 0):.3f} "
            f"CPU s, +{net.get('peak_mib', 0):.0f} MiB | at step {last.get('step')}: "
            f"{fmt(last)} ({last.get('time', 0) / 60:.1f} min) | equal time: "
            f"{fmt(result['equal_time'])} (step {result['equal_time'].get('step')})"
        )
        samples = " | ".join(f"{k} steps: {fmt(v)}" for k, v in result["sampling"].items())
        print(f"{'':9s} samples at {samples}")
        for point in curve:
            print(f"{'':9s}   step {point['step']:5d} {point['time'] / 60:6.1f} min {fmt(point)}")


def run(root: Path, data: str, steps: int, given: Path | None) -> dict:
    base = upstream(root, data, given)
    runs = train_variants(root, data, base, steps)
    curves = {variant: read_curve(run_dir) for variant, run_dir in runs.items()}
    shortest = min(curve[-1]["time"] for curve in curves.values() if curve)
    sampling = evaluate_samples(runs)
    nets = measure_nets(root, data, base)
    results = {}
    for variant in runs:
        results[variant] = {
            "curve": curves[variant],
            "equal_time": at_time(curves[variant], shortest),
            "sampling": sampling[variant],
            "net": nets.get(variant, {}),
        }
    (root / data / "results.json").write_text(json.dumps(results, indent=2))
    report(data, results)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.objectives")
    parser.add_argument("--data", nargs="+", default=["shapes", "shapes_mixed"])
    parser.add_argument("--steps", type=int, default=3000, help="U-Net steps per variant")
    parser.add_argument("--root", type=Path, default=Path("outputs/bench-objectives"))
    parser.add_argument("--upstream", type=Path, help="a folder with clip/export and vae/export")
    parser.add_argument("--set", nargs="*", default=[], help="KEY=VALUE overrides for every run")
    parser.add_argument("--measure", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--exports", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    EXTRA[:] = args.set
    if args.measure:
        args.data = args.data[0]
        measure_net(args)
        return
    shapes_upstream = args.upstream
    for data in args.data:
        given = args.upstream
        if given is None and data != "shapes" and shapes_upstream is None:
            given = args.root / "shapes" / "upstream"  # the shapes CLIP and VAE serve here too
            given = given if (given / "vae" / "export").is_dir() else None
        run(args.root, data, args.steps, given)


if __name__ == "__main__":
    main(sys.argv[1:])
