"""What the processes of a run do together after training: the export, on every rank
(DESIGN.md, convention 15: no collective on one rank alone).

    export_stage(module, out_dir, rebuild, model=trainer.strategy.model)   # on every rank

With the weights whole on every rank (one process, DDP), rank 0 exports the module as it is. With
them sharded (Lightning's FSDPStrategy, torch's fully_shard) no rank holds them whole: every rank
takes part in gathering the full state dict onto rank 0's CPU (torch.distributed.checkpoint's
get_model_state_dict, which knows FSDP1, FSDP2 and DDP), and rank 0 loads it into a fresh copy of
the stage (`rebuild`, from the config) and exports that. Then rank 0 sends every rank the folder it
wrote, or the error it hit: no rank moves on (say, to the chain's next stage, which reads the
export) before the folder is complete, and none waits forever on a rank 0 that failed.

CpuFSDPStrategy runs Lightning's FSDPStrategy on the CPU (gloo), to rehearse trainer=fsdp.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import FSDPStrategy
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FullyShardedDataParallel

from ldm_train.atomic import write_folder
from ldm_train.errors import UserError

try:  # FSDP2 (torch.distributed.fsdp.fully_shard) is public from torch 2.6
    from torch.distributed.fsdp import FSDPModule

    SHARDED_TYPES: tuple[type, ...] = (FullyShardedDataParallel, FSDPModule)
except ImportError:  # pragma: no cover - torch < 2.6
    SHARDED_TYPES = (FullyShardedDataParallel,)

T = TypeVar("T")


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def global_rank() -> int:
    return dist.get_rank() if distributed() else 0


def is_sharded(model: torch.nn.Module) -> bool:
    """True when the weights of `model` lie split across ranks (FSDP1 or FSDP2)."""
    return any(isinstance(m, SHARDED_TYPES) for m in model.modules())


def full_weights(model: torch.nn.Module) -> contextlib.AbstractContextManager:
    """For a block that calls parts of a wrapped model directly (the validation samples call the
    U-Net, not the LightningModule): under FSDP1 the root unit's own weights gathered on every
    rank (a collective; the inner units gather theirs in their forward, as in training). Nothing
    to do for other models: FSDP2 modules gather in each forward."""
    if isinstance(model, FullyShardedDataParallel):
        return FullyShardedDataParallel.summon_full_params(model, recurse=False, writeback=False)
    return contextlib.nullcontext()


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict on rank 0's CPU, {} on the other ranks; keys as in the unwrapped model.
    A collective when the model is sharded: every rank must call it."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


def from_rank_zero(produce: Callable[[], T]) -> T:
    """produce() on rank 0; its result, or its error, on every rank. Returns on no rank before
    rank 0 is done (the broadcast waits for it)."""
    result, error = None, None
    if global_rank() == 0:
        try:
            result = produce()
        except Exception as raised:
            error = raised
    if distributed():
        sent = error if isinstance(error, UserError) else None
        if error is not None and sent is None:  # any exception, in a form every rank can unpickle
            sent = RuntimeError(f"rank 0 failed: {type(error).__name__}: {error}")
        box = [(result, sent)]
        dist.broadcast_object_list(box, src=0)
        result, sent = box[0]
        error = error or sent
    if error is not None:
        raise error
    return result


def export_stage(
    module: torch.nn.Module,
    out_dir: Path,
    rebuild: Callable[[], torch.nn.Module],
    model: torch.nn.Module | None = None,
) -> Path | None:
    """module.export(out_dir) with the whole weights, written by rank 0; every rank must call it
    and gets the folder (None: the stage exports nothing). model: what wraps module for training
    (trainer.strategy.model); rebuild: a fresh module of the same stage, for rank 0 to load the
    gathered weights into when they are sharded."""
    model = module if model is None else model
    # A fresh folder beside out_dir, moved into place whole (ldm_train.atomic): a run's export/
    # is the run directory's own, replaced by each export.
    if not is_sharded(model):
        return from_rank_zero(
            lambda: write_folder(out_dir, module.export, "export", ours=True, may_skip=True)
        )
    state = full_state_dict(model)  # on every rank

    def export_whole() -> Path | None:
        whole = rebuild()
        whole.load_state_dict(state)
        return write_folder(out_dir, whole.export, "export", ours=True, may_skip=True)

    return from_rank_zero(export_whole)


class CpuFSDPStrategy(FSDPStrategy):
    """Lightning's FSDPStrategy on the CPU over gloo, to rehearse trainer=fsdp without a GPU:
        trainer=fsdp trainer.accelerator=cpu trainer.precision=32-true \\
          trainer.strategy._target_=ldm_train.distributed.CpuFSDPStrategy
    Lightning refuses FSDP on the CPU, and torch's FSDP runs there only when told its device: so
    this wraps the module itself with device_id=cpu (what Lightning's _setup_model does with the GPU's
    index) and leaves the rest to Lightning. Slower than DDP on a CPU: for checks, not for speed."""

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.root_device.type == "cpu" and not is_sharded(model):
            model = FullyShardedDataParallel(
                module=model,
                cpu_offload=self.cpu_offload,
                mixed_precision=self.mixed_precision_config,
                sharding_strategy=self.sharding_strategy,
                device_id=torch.device("cpu"),
                **self.kwargs,
            )
            self.kwargs.pop("auto_wrap_policy", None)  # applied: Lightning would warn it is ignored
        return super()._setup_model(model)
