"""Loading never executes code from a file. A config read from disk (a run folder's config.yaml,
which anyone can hand you with a checkpoint) is instantiated only after every `_target_` in it
passes check_targets; checkpoints are read with torch.load(weights_only=True) (load_checkpoint).

Hydra instantiates whatever callable a `_target_` names (its blocklist only stops os.system and
friends), so `{_target_: torch.load, f: payload.pkl, weights_only: false}` would run a pickle.
Allowed here: what this package defines; classes of the libraries a stage is built from (torch,
lightning, diffusers, open_clip, transformers, torchvision, torchmetrics) that are modules,
optimizers, schedulers, callbacks, loggers, metrics or tokenizers; a short list of library functions
the config uses; and what the user allows explicitly (`allow=`: exact names or "package." prefixes).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig

from ldm_train.errors import UserError

LIBRARIES = (
    "torch",
    "lightning",
    "diffusers",
    "open_clip",
    "transformers",
    "torchvision",
    "torchmetrics",
)
# Library functions the config calls; each builds an object and reads nothing from disk.
FUNCTIONS = frozenset(
    {
        "diffusers.optimization.get_constant_schedule_with_warmup",
        "diffusers.optimization.get_cosine_schedule_with_warmup",
        "diffusers.optimization.get_scheduler",
        "hydra.utils.get_class",  # with a `path` that is checked as a target itself
        "hydra.utils.get_method",
    }
)
NAME_ARGUMENT = ("hydra.utils.get_class", "hydra.utils.get_method")


def safe_bases() -> tuple[type, ...]:
    import lightning as L
    from diffusers.schedulers.scheduling_utils import SchedulerMixin
    from lightning.pytorch.loggers import Logger
    from open_clip.tokenizer import SimpleTokenizer
    from torchmetrics import Metric

    return (
        torch.nn.Module,
        torch.optim.Optimizer,
        torch.optim.lr_scheduler.LRScheduler,
        SchedulerMixin,
        L.Callback,
        L.Trainer,
        Logger,
        Metric,
        SimpleTokenizer,
    )


def targets(node: Any, where: str = "") -> Iterator[tuple[str, str]]:
    """(config path, target name) of every `_target_` in a config, and of the `path` that
    hydra.utils.get_class / get_method resolve."""
    if isinstance(node, DictConfig | dict):
        target = node.get("_target_")
        if isinstance(target, str):
            yield where or "<root>", target
            if target in NAME_ARGUMENT and isinstance(node.get("path"), str):
                yield f"{where}.path", node["path"]
        for key, value in node.items():
            yield from targets(value, f"{where}.{key}" if where else str(key))
    elif isinstance(node, ListConfig | list | tuple):
        for i, value in enumerate(node):
            yield from targets(value, f"{where}[{i}]")


def allowed(name: str, allow: Iterable[str] = ()) -> bool:
    if any(name == a or (a.endswith(".") and name.startswith(a)) for a in allow):
        return True
    if name.startswith("ldm_train.") or name in FUNCTIONS:
        return True
    if name.split(".")[0] not in LIBRARIES:
        return False  # not even imported: importing a module can run its code
    module, _, attribute = name.rpartition(".")
    try:
        obj = getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError):
        return False
    return isinstance(obj, type) and issubclass(obj, safe_bases())


def check_targets(
    cfg: Any, source: str | Path, allow: Iterable[str] = (), prefix: str = ""
) -> None:
    """A one-line UserError for the first `_target_` in cfg (the node at `prefix` of the file
    `source`) that is not allowed (see above)."""
    allow = tuple(allow)
    for where, name in targets(cfg, prefix):
        if not allowed(name, allow):
            raise UserError(
                f"{source}: {where} asks to run {name!r}, which is not a module, optimizer, "
                "scheduler, callback or function this package builds stages from; refusing to "
                "load it (if you trust that file, allow the name explicitly)"
            )


def load_checkpoint(path: str | Path) -> dict:
    """A Lightning checkpoint's dict, read without unpickling code (weights_only=True: tensors,
    containers and plain values, which is all our checkpoints hold)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any failure is the file's, said in one line
        reason = (
            str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        )
        raise UserError(
            f"cannot load {path} as a checkpoint without running code from it ({reason}); "
            "only checkpoints of tensors and plain values load"
        ) from None
