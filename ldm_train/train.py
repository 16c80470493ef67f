"""train(cfg): build data, stage module, logger, callbacks and trainer from the config; fit."""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import secrets
from pathlib import Path
from typing import Any

import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import get_class, instantiate
from lightning.pytorch.callbacks import (
    LearningRateMonitor,
    ModelCheckpoint,
    ProgressBar,
    WeightAveraging,
)
from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from ldm_train import quiet
from ldm_train.atomic import write_text
from ldm_train.callbacks.checkpoint import AtomicCheckpointIO
from ldm_train.checks import check_values
from ldm_train.data.datamodule import WebDataModule
from ldm_train.distributed import export_stage
from ldm_train.errors import UserError, check_keys, first_line
from ldm_train.rundir import RunDir

log = logging.getLogger(__name__)
EXTRAS = "pip install 'ldm_train[tensorboard]' / [bnb] / [slurm] / [metrics]"


def build(spec: DictConfig, **kwargs: Any) -> Any:
    """hydra's instantiate, but a UserError raised while building stays a one-line UserError, and
    a missing optional package (e.g. logger=tensorboard without the extra) is one too."""
    try:
        return instantiate(spec, **kwargs)
    except InstantiationException as error:
        if isinstance(error.__cause__, UserError):
            raise error.__cause__ from None
        if isinstance(error.__cause__, ImportError):
            raise UserError(
                f"{spec.get('_target_')} needs a package that is not installed: "
                f"{first_line(error.__cause__)} (the optional extras: {EXTRAS})"
            ) from None
        raise


def validate(cfg: DictConfig) -> None:
    """One-line errors for bad options, before anything is built."""
    trainer_keys = set(inspect.signature(L.Trainer.__init__).parameters) - {"self"}
    check_keys("trainer", [k for k in cfg.trainer if k != "_target_"], trainer_keys)
    check_values(cfg)


def wandb_has_credentials() -> bool:
    """True if W&B could log in without asking (API key in the environment or a saved login)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def wandb_run_id(run: RunDir, resuming: bool) -> str:
    """The W&B run id of this run directory: a resumed run continues the same W&B run."""
    id_file = run.wandb_id
    if resuming and id_file.is_file():
        return id_file.read_text().strip()
    run_id = secrets.token_hex(4)  # W&B takes any [a-z0-9] id
    # Every DDP process builds a logger, but only rank 0 starts the W&B run: the others must not
    # overwrite its id (the rank comes from the launcher's environment: RANK, LOCAL_RANK, SLURM_PROCID).
    if rank_zero_only.rank == 0:
        write_text(id_file, run_id)
    return run_id


def sweep_grouping(cfg: DictConfig) -> dict[str, str]:
    """W&B group and run name of a multirun job: the sweep's jobs share one group, named after the
    sweep's directory, and each run's name ends with the job's overrides. {} outside a multirun."""
    if not HydraConfig.initialized():
        return {}
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return {}
    job = hydra_cfg.job.override_dirname or f"job{hydra_cfg.job.num}"
    return {
        "group": f"{cfg.experiment_name}-{Path(hydra_cfg.sweep.dir).name}",
        "name": f"{cfg.logger.name}[{job}]",
    }


def build_logger(cfg: DictConfig, resuming: bool = False) -> Logger | None:
    if not cfg.get("logger") or "_target_" not in cfg.logger:
        return None
    if cfg.logger._target_.endswith("WandbLogger"):
        offline = cfg.logger.get("offline")
        if offline is None:
            offline = os.environ.get("WANDB_MODE") == "offline" or not wandb_has_credentials()
        if offline:
            log.info(
                "W&B logs offline (no credentials); upload later with `wandb sync %s/wandb/offline-run-*`",
                cfg.paths.run_dir,
            )
        # wandb must never stop to ask for a login.
        os.environ.setdefault("WANDB_SILENT", "true")
        run_id = cfg.logger.get("id") or wandb_run_id(RunDir(cfg.paths.run_dir), resuming)
        names = {"group": cfg.experiment_name, **sweep_grouping(cfg)}
        if cfg.logger.get("group"):  # the user's own group wins
            names["group"] = cfg.logger.group
        return build(cfg.logger, offline=bool(offline), id=run_id, resume="allow", **names)
    return build(cfg.logger)


def build_callback(spec: DictConfig, run: RunDir) -> L.Callback:
    """A callback of the config; checkpoints go where the run directory keeps them."""
    if issubclass(get_class(spec._target_), ModelCheckpoint):
        return build(spec, dirpath=str(run.checkpoints))
    return build(spec)


def build_callbacks(cfg: DictConfig, logger: Logger | None) -> list[L.Callback]:
    run = RunDir(cfg.paths.run_dir)
    callbacks = [
        build_callback(spec, run) for spec in (cfg.get("callbacks") or {}).values() if spec
    ]
    if logger is None:  # LearningRateMonitor refuses to run without a logger
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    if not cfg.trainer.get("enable_progress_bar", True):  # Lightning refuses a bar then
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    return callbacks


def build_strategy(module: L.LightningModule, spec: Any) -> Any:
    """trainer.strategy (a name, or a config such as trainer=fsdp's), checked against the stage.

    In manual optimization a stage steps its optimizers on separate losses (the VAE's autoencoder
    and discriminator), so each backward leaves the other part's parameters without gradients,
    which DDP refuses unless it looks for unused parameters (a graph traversal per step that the
    other stages need not pay for)."""
    if spec == "ddp" and not module.automatic_optimization:
        return "ddp_find_unused_parameters_true"
    if not isinstance(spec, DictConfig):
        return spec
    strategy = instantiate(spec)
    if isinstance(strategy, FSDPStrategy) and any(
        isinstance(c, WeightAveraging) for c in module.configure_callbacks() or []
    ):
        # Lightning's WeightAveraging keeps an unsharded copy: "sharded models do not work with
        # weight averaging"; caught here rather than as a shape error inside the first step.
        raise UserError(
            "trainer=fsdp cannot keep an EMA of sharded weights (Lightning's weight averaging): "
            "set model.ema_decay=null, or use trainer=ddp if the model fits on one GPU"
        )
    return strategy


def train(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Train the stage cfg.stage.name; return (final metrics, the objects built)."""
    quiet.install(cfg)
    if cfg.stage.name == "all":
        raise UserError("stage=all is the chain of stages: run it with ldm_train.chain.train_chain")
    validate(cfg)
    L.seed_everything(cfg.seed, workers=True)
    run = RunDir(cfg.paths.run_dir)
    cfg.paths.run_dir = str(run.path)  # chosen once (ldm_train.rundir.run_dir)
    # Rank 0 holds the run directory (the processes a launcher starts for other ranks join it).
    with run.lock() if rank_zero_only.rank == 0 else contextlib.nullcontext():
        ckpt_path = run.resume_checkpoint(cfg.resume, cfg.get("ckpt_path"), cfg.stage.name)
        if ckpt_path is not None:
            run.check_same_run(cfg, cfg.resume)
        run.save_config(cfg)
        return fit(cfg, run, ckpt_path)


def fit(cfg: DictConfig, run: RunDir, ckpt_path: str | None) -> tuple[dict, dict]:
    """Build the data, the stage, the logger and the trainer; fit (from ckpt_path); export."""
    datamodule = WebDataModule.from_config(cfg.data)
    module = build(cfg.stage.module)
    logger = build_logger(cfg, resuming=ckpt_path is not None)
    trainer: L.Trainer = instantiate(
        cfg.trainer,
        strategy=build_strategy(module, cfg.trainer.get("strategy", "auto")),
        logger=logger if logger is not None else False,
        callbacks=build_callbacks(cfg, logger),
        default_root_dir=str(run.path),
        # Checkpoints written beside their target and renamed (a full disk leaves the last one),
        # unless the user's trainer.plugins say otherwise.
        **({} if cfg.trainer.get("plugins") else {"plugins": [AtomicCheckpointIO()]}),
    )
    if logger is not None:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    # weights_only: a checkpoint is read without unpickling code (ours hold tensors and values).
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)

    if isinstance(logger, WandbLogger):
        logger.experiment.finish()  # the next stage in this process starts its own W&B run
    metrics = {name: float(value) for name, value in trainer.callback_metrics.items()}
    # Every rank: under FSDP the weights are gathered from all of them (rank 0 writes).
    export_dir = export_stage(
        module, run.export, lambda: build(cfg.stage.module), model=trainer.strategy.model
    )
    if trainer.is_global_zero:
        exported = f"; exported to {export_dir}" if export_dir else ""
        log.info(
            "stage %s: %d steps; outputs in %s%s",
            cfg.stage.name,
            trainer.global_step,
            run.path,
            exported,
        )
    objects = {
        "trainer": trainer,
        "module": module,
        "datamodule": datamodule,
        "run_dir": run.path,
        "export_dir": export_dir,
    }
    return metrics, objects
