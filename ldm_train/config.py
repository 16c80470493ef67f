"""Where the config tree lives, composing it outside the CLI, and checks on a user's options."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig


class UserError(Exception):
    """A mistake in the user's input: printed as one line, without a traceback."""


def config_dir() -> Path:
    """conf/ of a checkout, else the copy a wheel carries inside the package (pyproject.toml)."""
    package = Path(__file__).resolve().parent
    checkout = package.parent / "conf"
    return checkout if (checkout / "config.yaml").is_file() else package / "conf"


def compose_config(overrides: Sequence[str] = (), return_hydra_config: bool = False) -> DictConfig:
    """The config `python -m ldm_train <overrides>` would run with (for tests and notebooks)."""
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=return_hydra_config)


def check_choice(option: str, value: object, valid: Iterable[object]) -> None:
    """Raise a UserError naming the option, the bad value and the valid ones."""
    valid = list(valid)
    if value not in valid:
        raise UserError(
            f"{option}={value!r} is not valid; choose one of: {', '.join(map(str, valid))}"
        )


def check_keys(section: str, given: Iterable[str], valid: Iterable[str]) -> None:
    """Raise a UserError for the first unknown key, with the closest valid one and the full list."""
    valid = sorted(valid)
    for key in given:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f" (did you mean {section}.{close[0]}?)" if close else ""
            raise UserError(
                f"unknown option {section}.{key}{hint}; valid options: {', '.join(valid)}"
            )
