"""The run directory: one module knows where a run keeps its config, checkpoints, export and W&B
id; train, export, the chain and the tests ask it.

    outputs/<experiment>/<stage>/      paths.run_dir (a multirun job: its sweep subfolder); a run
    outputs/<experiment>/<stage>-2/    with other settings than the one there: the next free number
      config.yaml                      the resolved config of the run
      checkpoints/last.ckpt            what resume=auto continues from
      checkpoints/step<N>.ckpt         every checkpoint_every_n_steps (newest keep_last_checkpoints)
      export/                          what later stages and users load
      wandb_run_id                     the W&B run a resumed run continues
      run.lock                         held while a run writes here (pid, host)

Which folder a run takes (${run_dir:<base>}, paths.run_dir): with resume=auto, the folder of the
same run (same settings: SAME_RUN) if there is one, so that rerunning a command continues it;
else the base folder if it is free, else the first free <base>-N, and the log says why. The
config spells another stage's export as ${run_export:vae}: the newest export of that stage in the
experiment (any of its numbered folders). Both resolvers are registered here, so the layout is
written down once.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from ldm_train.atomic import write_text
from ldm_train.checkpoints import check_stage, unreadable
from ldm_train.errors import UserError, first_line
from ldm_train.same_run import config_changes

log = logging.getLogger(__name__)

CONFIG = "config.yaml"
CHECKPOINTS = "checkpoints"
LAST = "last.ckpt"
EXPORT = "export"
WANDB_ID = "wandb_run_id"
LOCK = "run.lock"
# auto: continue from the newest checkpoint that loads, refusing a changed config; force: continue
# even so; never: start afresh (earlier checkpoints moved aside).
RESUME_MODES = ("auto", "force", "never")


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

    def saved_config(self) -> DictConfig | None:
        """The config.yaml of the run here; None if there is none (or it cannot be read)."""
        try:
            return OmegaConf.load(self.config) if self.config.is_file() else None
        except Exception:  # noqa: BLE001 - a broken file holds no run we could continue
            return None

    def save_config(self, cfg: DictConfig, resolve: bool = True) -> None:
        """The config (without Hydra's own node; resolved unless told), written whole: other
        processes choose their folder by reading it. Logs why this run took a numbered folder."""
        if rank_zero_only.rank == 0 and str(self.path.resolve()) in CHOSEN:
            log.info("%s", CHOSEN.pop(str(self.path.resolve())))
        own = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
        write_text(self.config, OmegaConf.to_yaml(own, resolve=resolve))  # beside, then renamed

    def find_checkpoint(self) -> Path:
        """last.ckpt, for commands given a run directory instead of a checkpoint file."""
        if not self.last_checkpoint.is_file():
            raise UserError(
                f"no checkpoint at {self.last_checkpoint}; pass a .ckpt file or a run directory "
                f"that has {CHECKPOINTS}/{LAST} (train one with `python -m ldm_train stage=...`)"
            )
        return self.last_checkpoint

    def resume_checkpoint(
        self, resume: str, ckpt_path: str | None = None, stage: str | None = None
    ) -> str | None:
        """The checkpoint to resume from: ckpt_path if given; else, with resume=auto, the newest of
        last.ckpt and Lightning's SLURM requeue checkpoints (hpc_ckpt_N.ckpt); resume=never moves
        the earlier checkpoints aside (nothing is deleted) and starts afresh. A checkpoint of
        another stage than `stage` is refused in one line naming both."""
        if ckpt_path:
            if not Path(ckpt_path).is_file():
                raise UserError(
                    f"ckpt_path={ckpt_path} does not exist; pick a .ckpt file (e.g. in "
                    f"{self.checkpoints}) or drop ckpt_path"
                )
            problem = unreadable(Path(ckpt_path), stage)
            if problem is not None:
                raise UserError(f"ckpt_path={ckpt_path}: {problem}; pick a checkpoint of this run")
            return str(ckpt_path)
        if resume == "never":
            if rank_zero_only.rank == 0:  # other ranks' processes start later: nothing to move
                self.set_checkpoints_aside()
            return None
        return self.newest_checkpoint(resume, stage)

    def newest_checkpoint(self, resume: str, stage: str | None) -> str | None:
        candidates = [
            self.last_checkpoint,
            *self.path.glob("hpc_ckpt_*.ckpt"),
            *self.checkpoints.glob("step*.ckpt"),
        ]
        skipped = []
        for path in sorted(
            (p for p in candidates if p.is_file()), key=lambda p: p.stat().st_mtime, reverse=True
        ):
            problem = unreadable(path)
            if problem is None:
                if stage is not None:
                    check_stage(path, stage)
                also = f" (skipped {'; '.join(skipped)})" if skipped else ""
                log.info("resume=%s: continuing from %s%s", resume, path, also)
                return str(path)
            skipped.append(f"{path.name}: {problem}")
        if skipped:
            raise UserError(
                f"resume: no checkpoint in {self.checkpoints} loads ({'; '.join(skipped)}); "
                "rerun with resume=never to start afresh (they are moved aside, not deleted)"
            )
        return None

    def set_checkpoints_aside(self) -> None:
        """Move earlier checkpoints out of the way of a new run's ModelCheckpoint."""
        if self.checkpoints.is_dir() and any(self.checkpoints.iterdir()):
            kept = self.checkpoints.with_name(f"{CHECKPOINTS}-{time.strftime('%Y%m%d-%H%M%S')}")
            self.checkpoints.rename(kept)
            log.info("resume=never: moved the earlier checkpoints to %s", kept)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Held while a run writes here: a second run into a live run directory is refused; the
        lock of a process that is gone (kill -9, a crash) is taken over with a message."""
        self.path.mkdir(parents=True, exist_ok=True)
        lock, mine = self.path / LOCK, {"pid": os.getpid(), "host": socket.gethostname()}
        for _ in range(2):
            try:
                with open(lock, "x") as f:  # exclusive create: one winner
                    json.dump(mine | {"started": time.strftime("%Y-%m-%d %H:%M:%S")}, f)
                break
            except FileExistsError:
                take_over_if_stale(lock, mine)
        try:
            yield
        finally:
            lock.unlink(missing_ok=True)

    def read_config(self) -> DictConfig:
        """The run's config.yaml as data, for commands handed a run folder: a one-line UserError
        when it is missing, not YAML, not a mapping, or holds an interpolation (a saved config is
        resolved; an interpolation in one was written by hand, and resolvers read the
        environment and the disk)."""
        if not self.config.is_file():
            raise UserError(
                f"no {CONFIG} at {self.config}: a checkpoint must sit in a run's {CHECKPOINTS}/ "
                "folder, beside the config that trained it"
            )
        try:
            cfg = OmegaConf.load(self.config)
        except Exception as error:  # noqa: BLE001 - YAML's many errors: the file's, one line
            raise UserError(
                f"{self.config} is not a readable config: {first_line(error)}"
            ) from None
        if not isinstance(cfg, DictConfig):
            raise UserError(f"{self.config} is not a config (a mapping of keys to values)")
        interpolation = first_interpolation(OmegaConf.to_container(cfg, resolve=False))
        if interpolation is not None:
            raise UserError(
                f"{self.config}: {interpolation[0]}={interpolation[1]!r} is an interpolation; "
                "a saved config holds values only"
            )
        return cfg

    def check_same_run(self, cfg: DictConfig, resume: str) -> None:
        """A resumed run continues the run its config.yaml describes: changed settings are a
        different run, refused (listing them) unless resume=force."""
        if resume == "force" or not self.config.is_file():
            return
        changed = config_changes(OmegaConf.load(self.config), cfg)
        if changed:
            shown = ", ".join(changed[:6]) + (
                f" and {len(changed) - 6} more" if len(changed) > 6 else ""
            )
            raise UserError(
                f"resuming {self.path} with other settings than it was trained with ({shown}): "
                "resume=force continues anyway, resume=never starts afresh, or pick another "
                "experiment_name"
            )


def take_over_if_stale(lock: Path, mine: dict) -> None:
    """Remove the lock if its process is gone (on this host); else refuse in one line."""
    try:
        holder = json.loads(lock.read_text() or "{}")
    except (OSError, ValueError):
        holder = {}
    pid, host = holder.get("pid"), holder.get("host")
    if host == mine["host"] and isinstance(pid, int) and not process_alive(pid):
        log.warning(
            "%s: taking over the lock of pid %d, which is no longer running", lock.parent, pid
        )
        lock.unlink(missing_ok=True)
        return
    raise UserError(
        f"{lock.parent} is in use by another run (pid {pid} on {host}, since "
        f"{holder.get('started')}): wait for it, or give this run its own experiment_name or "
        f"paths.run_dir; if that run is gone, delete {lock}"
    )


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, another user's
    return True


def first_interpolation(node: object, where: str = "") -> tuple[str, str] | None:
    """(key, text) of the first string of a plain config that OmegaConf would resolve."""
    if isinstance(node, str):
        return (where, node) if "${" in node else None
    items = (
        node.items()
        if isinstance(node, dict)
        else enumerate(node)
        if isinstance(node, list)
        else ()
    )
    for key, value in items:
        found = first_interpolation(value, f"{where}.{key}" if where else str(key))
        if found is not None:
            return found
    return None


def numbered(base: Path) -> Iterator[RunDir]:
    """base, base-2, base-3, ...: the folders runs of one experiment and stage take, in order."""
    yield RunDir(base)
    for number in itertools.count(2):
        yield RunDir(base.with_name(f"{base.name}-{number}"))


def existing(base: Path) -> list[RunDir]:
    """base and its numbered folders that exist, in number order."""
    found = {base.name: RunDir(base)} if base.is_dir() else {}
    for path in base.parent.glob(f"{glob.escape(base.name)}-*"):
        if path.name.removeprefix(f"{base.name}-").isdigit() and path.is_dir():
            found[path.name] = RunDir(path)
    return sorted(found.values(), key=lambda run: (len(run.path.name), run.path.name))


# Why a run went to a numbered folder, logged by the run (train) once logging is set up: Hydra
# resolves paths.run_dir before it configures logging.
CHOSEN: dict[str, str] = {}


def choose_run_dir(base: Path, cfg: DictConfig) -> RunDir:
    """resume=auto's folder: the one holding this run (same settings), else the first free one."""
    others = []
    for run in existing(base):
        saved = run.saved_config()
        if saved is not None:
            changes = config_changes(saved, cfg)
            if not changes:
                return run
            others.append((run, changes))
    free = next(run for run in numbered(base) if run.saved_config() is None)
    if others:
        nearest, changes = others[0]
        shown = ", ".join(changes[:4]) + (
            f" and {len(changes) - 4} more" if len(changes) > 4 else ""
        )
        held = f"{nearest.path}" + (f" (and {len(others) - 1} more)" if len(others) > 1 else "")
        CHOSEN[str(free.path.resolve())] = (
            f"{held} holds a run with other settings ({shown}): this one goes to {free.path} "
            f"(resume=force paths.run_dir={nearest.path} continues that one instead)"
        )
    return free


def run_dir(base: str, *, _root_: DictConfig) -> str:
    """${run_dir:<base>} in the config (paths.run_dir): resume=auto's choice; base otherwise (a
    given ckpt_path, resume=never or force: the folder as named). Chosen again at every access
    (OmegaConf caches no resolver of the whole config): train() and the CLI pin the answer."""
    if _root_.get("resume") != "auto" or _root_.get("ckpt_path"):
        return base
    return str(choose_run_dir(Path(base), _root_).path)


def run_export(stage: str, *, _root_: DictConfig) -> str:
    """${run_export:<stage>} in the config: that stage's newest export in this experiment (of its
    run folders, the one whose export was written last); the unnumbered folder's if none is."""
    base = RunDir.of_stage(_root_.paths.output_root, _root_.experiment_name, stage)
    exports = [run.export for run in existing(base.path) if run.export.is_dir()]
    newest = max(exports, key=written_at, default=base.export)
    return str(newest)


def written_at(folder: Path) -> float:
    """When the files of a folder were last written (not the folder's own mtime, which overwriting
    a file does not change)."""
    return max((f.stat().st_mtime for f in folder.rglob("*") if f.is_file()), default=0.0)


OmegaConf.register_new_resolver("run_export", run_export, replace=True)
OmegaConf.register_new_resolver("run_dir", run_dir, replace=True)
