"""What makes two runs the same run: the settings a resumed run must keep (SAME_RUN), those it may
change (MAY_CHANGE), and the differences between two configs in those terms. A rerun with the same
settings continues its run; one with other settings is another run (ldm_train.rundir gives it a
folder of its own, or refuses to resume it)."""

from __future__ import annotations

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError

# What a resumed run must keep to be the same run (config sections and trainer keys); keys under
# them that may change between a run and its resume (they do not change what is trained).
SAME_RUN = (
    "seed",
    "model",
    "stage",
    "data",
    "optimizer",
    "lr_scheduler",
    "trainer.precision",
    "trainer.accumulate_grad_batches",
    "trainer.gradient_clip_val",
)
MAY_CHANGE = (
    "lr_scheduler.training_steps",  # follows trainer.max_steps, which a resume may raise
    "stage.module.lr_scheduler.training_steps",
    "stage.module.perf",  # speed switches: the same training, faster
    "data.num_workers",
    # what validation looks at, not what trains
    "data.val_urls",
    "data.val_batch_size",
    "data.prompts",
    "data.zero_shot",
    "stage.module.validation",
    "stage.module.zero_shot",
    "stage.module.grid_images",
    "stage.module.metrics",  # the VAE's reconstruction distances
    "stage.chain",
    "stage.evaluate",
)


def flatten(node: dict, prefix: str = "") -> dict[str, object]:
    items: dict[str, object] = {}
    for key, value in node.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            items |= flatten(value, f"{name}.")
        else:
            items[name] = value
    return items


def same_run_part(cfg: DictConfig) -> dict:
    """The SAME_RUN sections of a config, resolved (only those: paths.run_dir, which may be
    resolving now, depends on them)."""
    part: dict = {}
    for section in SAME_RUN:
        try:
            value = OmegaConf.select(cfg, section, throw_on_missing=False)
            if isinstance(value, DictConfig | ListConfig):
                value = OmegaConf.to_container(value, resolve=True)
        except InterpolationResolutionError:  # stage=all's optimizer: each stage's model has lr
            value = "(unresolved)"
        part[section] = value
    return part


def config_changes(saved: DictConfig, current: DictConfig) -> list[str]:
    """Keys of the SAME_RUN sections whose values differ ("key: old -> new"); [] for the same run."""
    old, new = (flatten(same_run_part(c)) for c in (saved, current))
    keys = sorted(
        key
        for key in old.keys() | new.keys()
        if not any(key == m or key.startswith(f"{m}.") for m in MAY_CHANGE)
        and old.get(key) != new.get(key)
    )
    # A value the config copies by interpolation (model.lr into optimizer.lr ...) changes in every
    # copy: listed once, under its first key.
    changes: dict[str, str] = {}
    for key in keys:
        changes.setdefault(f"{old.get(key)!r} -> {new.get(key)!r}", key)
    return [f"{key}: {change}" for change, key in changes.items()]
