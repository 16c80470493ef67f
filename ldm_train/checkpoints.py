"""What a checkpoint file holds, read without running code from it (torch.load with
weights_only=True: tensors, containers and plain values, which is all our checkpoints hold), and
which stage wrote it: a run refuses another stage's checkpoint in one line naming both."""

from __future__ import annotations

from pathlib import Path

import torch

from ldm_train.errors import UserError, first_line

# A checkpoint's stage, as callbacks.checkpoint.StepCheckpoint records it.
STAGE_KEY = "ldm_train_stage"
# Weights only one stage's module holds: how a checkpoint without STAGE_KEY tells its stage.
STAGE_WEIGHTS = (
    ("clip", "net.visual."),
    ("vae", "net.encoder."),
    ("unet", "net.time_embedding."),
)


def load_checkpoint(path: str | Path) -> dict:
    """A Lightning checkpoint's dict, read without unpickling code (weights_only=True: tensors,
    containers and plain values, which is all our checkpoints hold)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any failure is the file's, said in one line
        raise UserError(
            f"cannot load {path} as a checkpoint without running code from it "
            f"({first_line(error)[:200]}); only checkpoints of tensors and plain values load"
        ) from None
    if not isinstance(state, dict) or not isinstance(state.get("state_dict"), dict):
        raise UserError(f"{path} is not a training checkpoint (no state_dict in it)")
    return state


def read_state(path: Path) -> dict | str:
    """A checkpoint's dict (mmap: only its index and pickled structure are read, not its
    tensors), or why it cannot be resumed from (truncated, empty, not a training checkpoint)."""
    if path.stat().st_size == 0:
        return "empty file"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # noqa: BLE001 - any failure means: not this one
        return first_line(error, 120)
    if not isinstance(state, dict) or "global_step" not in state:
        return "not a training checkpoint"
    return state


def unreadable(path: Path, stage: str | None = None) -> str | None:
    """Why a checkpoint cannot be resumed from, or None; with `stage`: also when it is another
    stage's."""
    state = read_state(path)
    if isinstance(state, str):
        return state
    found = checkpoint_stage(state)
    if stage is not None and found is not None and found != stage:
        return f"a stage={found} checkpoint, and this run is stage={stage}"
    return None


def check_stage(path: Path, stage: str) -> None:
    """A one-line UserError when the checkpoint at path is another stage's."""
    problem = unreadable(path, stage)
    if problem is not None:
        raise UserError(
            f"{path}: {problem}; give this stage's checkpoint (or run in another "
            "experiment_name / paths.run_dir)"
        )


def checkpoint_stage(state: dict) -> str | None:
    """The stage a checkpoint was trained by: recorded (StepCheckpoint), else told by its weights'
    names (checkpoints written before the record); None when neither says."""
    recorded = state.get(STAGE_KEY)
    if isinstance(recorded, str):
        return recorded
    names = state.get("state_dict")
    if not isinstance(names, dict):
        return None
    for stage, prefix in STAGE_WEIGHTS:
        if any(isinstance(name, str) and name.startswith(prefix) for name in names):
            return stage
    return None
