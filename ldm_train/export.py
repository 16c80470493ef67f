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

from hydra.utils import instantiate
from omegaconf import OmegaConf

from ldm_train import quiet
from ldm_train.errors import UserError
from ldm_train.rundir import RunDir
from ldm_train.safety import check_targets, load_checkpoint

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


def export_checkpoint(
    target: str | Path, out_dir: str | Path | None = None, allow: Sequence[str] = ()
) -> Path:
    """Export the stage saved in `target`; returns the export folder. allow: `_target_` names (or
    "package." prefixes) of the run's config to trust beyond ldm_train.safety's rules."""
    ckpt = find_checkpoint(Path(target))
    run = RunDir.of_checkpoint(ckpt)
    if not run.config.is_file():
        raise UserError(
            f"no {run.config.name} at {run.config}: the checkpoint must sit in a run's "
            f"{run.checkpoints.name}/ folder, beside the config that trained it"
        )
    cfg = OmegaConf.load(run.config)
    # A run folder is a file anyone can send: its config builds only what a stage is built from.
    check_targets(cfg.stage.module, run.config, allow, prefix="stage.module")
    state = load_checkpoint(ckpt)
    module = instantiate(cfg.stage.module)
    module.load_state_dict(state["state_dict"])
    exported = module.export(Path(out_dir) if out_dir else run.export)
    if exported is None:
        raise UserError(f"stage {cfg.stage.name} has nothing to export")
    return exported


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ldm_train.export", description=__doc__)
    parser.add_argument("target", help="a run directory (uses its last checkpoint) or a .ckpt file")
    parser.add_argument("--out", help="export folder (default: RUN_DIR/export)")
    parser.add_argument(
        "--allow-target",
        action="append",
        default=[],
        help="trust this _target_ of the run's config (a name, or a prefix ending in '.')",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    quiet.install()  # library notes a user cannot act on (ldm_train/quiet.py)
    try:
        print(f"exported to {export_checkpoint(args.target, args.out, args.allow_target)}")
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
