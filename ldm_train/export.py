"""python -m ldm_train.export RUN_DIR|CHECKPOINT [--out DIR]: export a stage from any checkpoint.

Rebuilds the stage from the resolved config.yaml its run saved, loads the checkpoint's weights and
calls the stage's export (what train() does at the end of a run).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ldm_train.config import UserError
from ldm_train.rundir import RunDir

log = logging.getLogger("ldm_train.export")


def find_checkpoint(target: Path) -> Path:
    """A .ckpt file as given, or a run directory's last.ckpt."""
    if target.is_dir():
        return RunDir(target).find_checkpoint()
    if not target.is_file():
        raise UserError(
            f"no checkpoint at {target}; pass a .ckpt file or a run directory "
            "(train one with `python -m ldm_train stage=...`)"
        )
    return target


def export_checkpoint(target: str | Path, out_dir: str | Path | None = None) -> Path:
    """Export the stage saved in `target`; returns the export folder."""
    ckpt = find_checkpoint(Path(target))
    run = RunDir.of_checkpoint(ckpt)
    if not run.config.is_file():
        raise UserError(
            f"no {run.config.name} at {run.config}: the checkpoint must sit in a run's "
            f"{run.checkpoints.name}/ folder, beside the config that trained it"
        )
    cfg = OmegaConf.load(run.config)
    module = instantiate(cfg.stage.module)
    state = torch.load(ckpt, map_location="cpu", weights_only=True)  # never runs code
    module.load_state_dict(state["state_dict"])
    exported = module.export(Path(out_dir) if out_dir else run.export)
    if exported is None:
        raise UserError(f"stage {cfg.stage.name} has nothing to export")
    return exported


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ldm_train.export", description=__doc__)
    parser.add_argument("target", help="a run directory (uses its last checkpoint) or a .ckpt file")
    parser.add_argument("--out", help="export folder (default: RUN_DIR/export)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        print(f"exported to {export_checkpoint(args.target, args.out)}")
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
