"""python -m ldm_train.export RUN_DIR|CHECKPOINT [--out DIR]: export a stage from any checkpoint.

Rebuilds the stage from the resolved config.yaml its run saved, through the registry of the parts a
stage is built from (ldm_train.safety: a run folder is a file anyone can hand you, and its config
names only parts, by name, with plain values), loads the checkpoint's weights and calls the
stage's export (what train() does at the end of a run). The folder is written beside DIR and moved
into place: an earlier export there is replaced, a folder of other files is refused.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig

from ldm_train import cli
from ldm_train.atomic import write_folder
from ldm_train.checkpoints import checkpoint_stage, load_checkpoint
from ldm_train.errors import UserError, first_line
from ldm_train.rules import Parser
from ldm_train.rundir import RunDir
from ldm_train.safety import Trusted, rebuild
from ldm_train.schema import check_config

STAGES = ("clip", "vae", "unet")


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


def run_stage(run: RunDir) -> tuple[DictConfig, str]:
    """(the run's saved config, checked as data, and its stage's name)."""
    cfg = run.read_config()
    stage = cfg.get("stage")
    name = stage.get("name") if isinstance(stage, DictConfig) else None
    if name not in STAGES or not isinstance(stage.get("module"), DictConfig):
        raise UserError(
            f"{run.config}: stage.name={name!r} with a stage.module is not a run of one of the "
            f"stages {', '.join(STAGES)}; point at the run directory of one"
        )
    try:
        check_config(cfg)
    except UserError as error:
        raise UserError(f"{run.config}: {error}") from None
    return cfg, name


def export_checkpoint(
    target: str | Path, out_dir: str | Path | None = None, trusted: Trusted | None = None
) -> Path:
    """Export the stage saved in `target`; returns the export folder. trusted: `_target_` names of
    the run's config to build beyond the registry (from the command line: --allow-target)."""
    ckpt = find_checkpoint(Path(target))
    run = RunDir.of_checkpoint(ckpt)
    cfg, stage = run_stage(run)
    state = load_checkpoint(ckpt)
    found = checkpoint_stage(state)
    if found is not None and found != stage:
        raise UserError(
            f"{ckpt} is a stage={found} checkpoint, but {run.config} is a stage={stage} run: "
            "pass the checkpoint of that run"
        )
    module = rebuild(cfg.stage.module, run.config, "stage.module", trusted)
    try:
        module.load_state_dict(state["state_dict"])
    except (RuntimeError, KeyError, TypeError) as error:
        raise UserError(
            f"{ckpt}: its weights do not fit the stage {run.config} describes ({first_line(error)})"
        ) from None
    out = Path(out_dir) if out_dir else run.export
    exported = write_folder(
        out,
        module.export,
        f"{stage} export",
        "--out",
        ours=out.resolve() == run.export.resolve(),
        may_skip=True,
    )
    if exported is None:
        raise UserError(f"stage {stage} has nothing to export")
    return exported


def main(argv: Sequence[str] | None = None) -> int:
    parser = Parser("python -m ldm_train.export", __doc__)
    parser.add_argument("target", help="a run directory (uses its last checkpoint) or a .ckpt file")
    parser.add_argument("--out", help="export folder (default: RUN_DIR/export)")
    parser.add_argument(
        "--allow-target",
        action="append",
        default=[],
        help="build this _target_ of the run's config too (a name, or a prefix ending in '.'): "
        "only for a run folder you trust",
    )
    args = parser.parse_args(argv)

    def export() -> int:
        trusted = Trusted(tuple(args.allow_target))
        print(f"exported to {export_checkpoint(args.target, args.out, trusted)}")
        return 0

    return cli.run("ldm_train.export", export)


if __name__ == "__main__":
    sys.exit(main())
