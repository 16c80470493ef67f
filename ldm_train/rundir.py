"""The run directory: one module knows where a run keeps its config, checkpoints, export and W&B
id; train, export, the chain and the tests ask it.

    outputs/<experiment>/<stage>/      paths.run_dir (a multirun job: its sweep subfolder)
      config.yaml                      the resolved config of the run
      checkpoints/last.ckpt            what resume=auto continues from
      checkpoints/step<N>.ckpt         every checkpoint_every_n_steps (newest keep_last_checkpoints)
      export/                          what later stages and users load
      wandb_run_id                     the W&B run a resumed run continues

The config spells another stage's export as ${run_export:vae} (a resolver registered here), so the
layout is written down once.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from ldm_train.errors import UserError

log = logging.getLogger(__name__)

CONFIG = "config.yaml"
CHECKPOINTS = "checkpoints"
LAST = "last.ckpt"
EXPORT = "export"
WANDB_ID = "wandb_run_id"
RESUME_MODES = ("auto", "never")


@dataclass(frozen=True)
class RunDir:
    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @classmethod
    def of_stage(cls, output_root: str | Path, experiment: str, stage: str) -> RunDir:
        """The run directory `python -m ldm_train stage=<stage>` uses for this experiment."""
        return cls(Path(output_root) / experiment / stage)

    @classmethod
    def of_checkpoint(cls, checkpoint: str | Path) -> RunDir:
        """The run a checkpoint file belongs to (it sits in <run>/checkpoints/)."""
        return cls(Path(checkpoint).resolve().parent.parent)

    @property
    def config(self) -> Path:
        return self.path / CONFIG

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoints / LAST

    @property
    def export(self) -> Path:
        return self.path / EXPORT

    @property
    def wandb_id(self) -> Path:
        return self.path / WANDB_ID

    def find_checkpoint(self) -> Path:
        """last.ckpt, for commands given a run directory instead of a checkpoint file."""
        if not self.last_checkpoint.is_file():
            raise UserError(
                f"no checkpoint at {self.last_checkpoint}; pass a .ckpt file or a run directory "
                f"that has {CHECKPOINTS}/{LAST} (train one with `python -m ldm_train stage=...`)"
            )
        return self.last_checkpoint

    def resume_checkpoint(self, resume: str, ckpt_path: str | None = None) -> str | None:
        """The checkpoint to resume from: ckpt_path if given; else, with resume=auto, the newest of
        last.ckpt and Lightning's SLURM requeue checkpoints (hpc_ckpt_N.ckpt); resume=never moves
        the earlier checkpoints aside (nothing is deleted) and starts afresh."""
        if ckpt_path:
            if not Path(ckpt_path).is_file():
                raise UserError(
                    f"ckpt_path={ckpt_path} does not exist; pick a .ckpt file (e.g. in "
                    f"{self.checkpoints}) or drop ckpt_path"
                )
            return str(ckpt_path)
        if resume == "never":
            self.set_checkpoints_aside()
            return None
        candidates = [self.last_checkpoint, *self.path.glob("hpc_ckpt_*.ckpt")]
        found = [p for p in candidates if p.is_file()]
        if not found:
            return None
        newest = max(found, key=lambda p: p.stat().st_mtime)
        log.info("resume=auto: continuing from %s", newest)
        return str(newest)

    def set_checkpoints_aside(self) -> None:
        """Move earlier checkpoints out of the way of a new run's ModelCheckpoint."""
        if self.checkpoints.is_dir() and any(self.checkpoints.iterdir()):
            kept = self.checkpoints.with_name(f"{CHECKPOINTS}-{time.strftime('%Y%m%d-%H%M%S')}")
            self.checkpoints.rename(kept)
            log.info("resume=never: moved the earlier checkpoints to %s", kept)


def run_export(stage: str, *, _root_) -> str:
    """${run_export:<stage>} in the config: that stage's export folder in this experiment."""
    return str(RunDir.of_stage(_root_.paths.output_root, _root_.experiment_name, stage).export)


OmegaConf.register_new_resolver("run_export", run_export, replace=True)
