"""Peak memory of each stage's default preset (tiny), each in its own process: peak RSS
(VmHWM, else ru_maxrss) after a few training steps through train() against the process just before fit
(imports, data and the built module), and CUDA's peak allocation when a GPU is there."""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import lightning as L
import torch

from benchmarks.common import make_data, setup_process, stage_config, write_upstream

STAGES = ("clip", "vae", "unet")
STEPS = 3


def peak_rss_mib() -> float:
    """This process's peak RSS. Linux: VmHWM of /proc/self/status, the peak of this process image;
    ru_maxrss would also keep the parent's peak, which a child inherits across fork and exec."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB; macOS: bytes


def run_fresh(
    module: str, option: str, name: str, tmp: Path | str, prefix: str
) -> tuple[list[str], str]:
    """`python -m module option name --tmp tmp` in a fresh process (ru_maxrss never goes down, so
    each measurement gets its own): the lines of its output that start with prefix, and the tail of
    its stderr (to show when there are none)."""
    result = subprocess.run(
        [sys.executable, "-m", module, option, name, "--tmp", str(tmp)],
        capture_output=True,
        text=True,
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith(prefix)]
    return lines, result.stderr[-2000:]


def fresh_process_main(
    option: str,
    names: Iterable[str],
    measure: Callable[[str, Path], None],
    main: Callable[[], None],
) -> None:
    """The command line of a benchmark that measures in fresh processes (run_fresh): with
    `option NAME --tmp DIR`, the child's measure(NAME, DIR); without, main()."""
    parser = argparse.ArgumentParser()
    parser.add_argument(option, choices=list(names))
    parser.add_argument("--tmp", type=Path)
    args = parser.parse_args()
    name = getattr(args, option.removeprefix("--"))
    if name:
        measure(name, args.tmp)
    else:
        main()


class BeforeFit(L.Callback):
    """Peak RSS when training starts (everything is built) and after the last step."""

    def __init__(self):
        self.before = 0.0

    def on_fit_start(self, trainer, pl_module) -> None:
        self.before = peak_rss_mib()


def measure(stage: str, tmp: Path) -> None:
    """In the child process: train STEPS steps of the stage's default preset; print one line."""
    from hydra.utils import instantiate

    from ldm_train.data.datamodule import WebDataModule
    from ldm_train.train import build, build_callbacks

    setup_process()
    cuda = torch.cuda.is_available()
    overrides = ["data.num_workers=0", f"trainer.accelerator={'gpu' if cuda else 'cpu'}"]
    if stage == "unet":
        upstream = write_upstream(tmp / "upstream")
        overrides += [f"stage.vae={upstream['vae']}", f"stage.text_encoder={upstream['clip']}"]
    cfg = stage_config(stage, tmp / "shapes-32", tmp / "out", *overrides)
    probe = BeforeFit()
    trainer = instantiate(
        cfg.trainer,
        max_steps=STEPS,
        logger=False,
        callbacks=[*build_callbacks(cfg, None), probe],
        default_root_dir=str(cfg.paths.run_dir),
    )
    trainer.fit(build(cfg.stage.module), datamodule=WebDataModule.from_config(cfg.data))
    peak = peak_rss_mib()
    line = (
        f"memory {stage:4s} (tiny, batch {cfg.data.batch_size}): peak RSS {peak:6.0f} MiB vs "
        f"{probe.before:6.0f} MiB before fit = {peak / probe.before:.2f}x"
    )
    if cuda:
        line += f"; CUDA peak allocated {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB"
    print(line, flush=True)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        make_data(Path(tmp) / "shapes-32", n_train=1024)
        for stage in STAGES:  # a fresh process each: ru_maxrss never goes down
            lines, errors = run_fresh("benchmarks.memory", "--stage", stage, tmp, "memory")
            print(lines[0] if lines else f"memory {stage}: failed\n{errors}")


if __name__ == "__main__":
    fresh_process_main("--stage", STAGES, measure, main)
