"""Library warnings and notes a user of ldm_train cannot act on, filtered at their source.

Each filter matches one message (not a whole category or module), so every other warning of the
same library still shows: a console that only prints what matters is read. install() is called
at the start of train(); DataLoader workers are forked and inherit the filters.
"""

from __future__ import annotations

import contextlib
import logging
import warnings

from omegaconf import DictConfig

# Message regexes, matched against the start of the warning's text; why each is noise above it.
WARNINGS = (
    # torchdata's StatefulDataLoader calls torch.set_vital, which torch has since deprecated; it is
    # inside torchdata and changes nothing for the run.
    r"'set_vital' is deprecated",
    # Lightning's own pytree helper uses a torch class torch deprecated; it works all the same.
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    # ThroughputMonitor asks for flops_per_batch: the stages that cannot count FLOPs (clip, vae)
    # still log samples/s and batches/s, which is what the monitor is there for.
    r"When using the `ThroughputMonitor`, you need to define a `flops_per_batch`",
    # resume=auto keeps writing into the run's checkpoints/ on purpose (resume=never moves an
    # earlier run's folder aside first), so a non-empty folder is the normal case.
    r"Checkpoint directory .* exists and is not empty",
    # Resuming with another checkpoint_every_n_steps gives our StepCheckpoint another state key:
    # the earlier step files are kept rather than ranked, nothing is lost. Only when StepCheckpoint
    # is the one "missing" callback: any other one still warns.
    r"Be aware that when using `ckpt_path`, callbacks used to create the checkpoint need to "
    r"be provided during `Trainer` instantiation\. Please add the following callbacks: "
    r"\[\"StepCheckpoint\{[^\]]*\}\"\]\.$",
    # DDP's reducer, when a parameter's gradient has another memory layout than its bucket (e.g.
    # with perf.channels_last): "not an error, but may impair performance", once, about its own
    # bucketing; nothing a user can change short of turning the speed switch off.
    r"Grad strides do not match bucket view strides",
    # diffusers' from_single_file passes huggingface_hub an argument the hub has deprecated (it
    # looks for an architecture in the local cache: nothing is downloaded).
    r"The `local_dir_use_symlinks` argument is deprecated",
)

# Log records (logger name -> message prefixes) that are advertisements or advice that does not
# apply: Lightning's tips for its cloud products, and diffusers' advice to install accelerate
# (which only speeds up loading very large models; ours load correctly without it).
LOG_NOTES = {
    # ... and which accelerators it did not find besides the GPU (no TPU or HPU user needs telling).
    # ... and why fit stopped at max_steps (our stage's last line says how many steps it ran).
    "lightning.pytorch.utilities.rank_zero": (
        "💡 Tip:",
        "TPU available:",
        "HPU available:",
        "`Trainer.fit` stopped: `max_steps=",
    ),
    "diffusers.models.modeling_utils": ("Cannot initialize model with low cpu memory usage",),
    "diffusers.pipelines.pipeline_utils": ("Cannot initialize model with low cpu memory usage",),
}


class DropMessages(logging.Filter):
    """A logging filter that drops records whose message starts with one of the prefixes."""

    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


# Lightning's WandbLogger passes anonymous=None to wandb.init, and wandb warns that the setting has
# no effect whatever its value. wandb prints through its own terminal helper, once per message
# (repeat=False); marking the message as printed is the one way to filter it.
WANDB_NOTES = ("The anonymous setting has no effect and will be removed in a future version.",)


def install(cfg: DictConfig | None = None) -> None:
    """Add the filters above (idempotent: warnings dedupes filters, loggers get one each); the
    wandb ones when cfg's logger is W&B (importing wandb takes a second: only then)."""
    run_logger = (cfg.get("logger") or {}) if cfg is not None else {}
    if str(run_logger.get("_target_", "")).endswith("WandbLogger"):
        hide_wandb_notes()
    for pattern in WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for name, prefixes in LOG_NOTES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropMessages) for f in logger.filters):
            logger.addFilter(DropMessages(prefixes))


def hide_wandb_notes() -> None:
    # Without wandb, or with one whose helper changed, the notes show: nothing breaks.
    with contextlib.suppress(ImportError, AttributeError):
        from wandb.errors import term

        for note in WANDB_NOTES:
            term._printed_messages.add(f"{term.WARN_STRING} {note}")
