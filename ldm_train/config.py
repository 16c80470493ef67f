"""Where the config tree lives, composing it outside the CLI, and checks on a user's options."""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, OverrideType
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf

import ldm_train.data.bucket_sizes  # noqa: F401  (registers the ${bucket_sizes:...} resolver)
import ldm_train.data.datamodule  # noqa: F401  (${shards_name:...}, data=webdataset's name)
import ldm_train.pretrained  # noqa: F401  (${pretrained_schedule:...})
import ldm_train.rundir  # noqa: F401  (registers ${run_dir:...} and ${run_export:...})
from ldm_train.errors import UserError, check_keys

__all__ = ["check_overrides", "compose_config", "config_dir"]

# Config choices that need an optional extra: (group, choice) -> (the plugin's module, its extra).
PLUGIN_CHOICES = {
    ("hydra/launcher", "slurm"): ("hydra_plugins.hydra_submitit_launcher", "slurm"),
}


def config_dir() -> Path:
    """conf/ of a checkout, else the copy a wheel carries inside the package (pyproject.toml)."""
    package = Path(__file__).resolve().parent
    checkout = package.parent / "conf"
    return checkout if (checkout / "config.yaml").is_file() else package / "conf"


def compose_config(overrides: Sequence[str] = (), return_hydra_config: bool = False) -> DictConfig:
    """The config `python -m ldm_train <overrides>` would run with (for tests and notebooks)."""
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=return_hydra_config)


def check_group_choice(override: Override) -> None:
    """group=choice naming no file of conf/<group>/: a UserError listing the choices next to it
    (Hydra's own message lists them only for top-level choices, not e.g. model=vae/huge)."""
    group, value = override.key_or_group.split("@")[0], override.value()
    if group.startswith("hydra") or not isinstance(value, str):
        return  # Hydra's own groups (plugins add choices), null, sweeps and deletions
    folder = config_dir() / group
    if (folder / f"{value}.yaml").is_file():
        return
    near = folder / Path(value).parent
    choices = sorted((near if near.is_dir() else folder).rglob("*.yaml"))
    names = [str(path.relative_to(folder).with_suffix("")) for path in choices]
    raise UserError(f"{override.input_line}: no such {group}; choose one of: {', '.join(names)}")


def check_overrides(argv: Sequence[str]) -> None:
    """Before Hydra runs: an override of a key that does not exist is a UserError that lists the
    valid keys at that level (Hydra itself only says the key is not in the struct)."""
    args = [a for a in argv if "=" in a and not a.startswith("-")]
    try:
        overrides = OverridesParser.create().parse_overrides(args)
    except HydraException:
        return  # Hydra reports syntax errors itself
    groups = [o for o in overrides if (config_dir() / o.key_or_group.split("@")[0]).is_dir()]
    for override in groups:
        check_group_choice(override)
        plugin = PLUGIN_CHOICES.get((override.key_or_group, str(override.value())))
        if plugin and importlib.util.find_spec(plugin[0]) is None:
            raise UserError(
                f"{override.input_line} needs an optional extra: pip install 'ldm_train[{plugin[1]}]' "
                f"(in a checkout: pip install -e '.[{plugin[1]}]')"
            )
    if any(o.is_sweep_override() for o in groups):
        return  # one config per sweep job: Hydra checks each
    try:
        cfg = compose_config([o.input_line for o in groups])
    except HydraException:
        return  # a bad group choice: Hydra lists the valid ones itself
    for override in overrides:
        key = override.key_or_group
        if override.type != OverrideType.CHANGE or override in groups or key.startswith("hydra"):
            continue
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(cfg, parent) if parent else cfg
        if isinstance(node, DictConfig) and leaf not in node:
            try:
                check_keys(parent or "config", [leaf], [str(k) for k in node])
            except UserError as error:
                raise UserError(f"{error}; to add a new key write +{key}=...") from None
