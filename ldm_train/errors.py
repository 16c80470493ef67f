"""A user's mistake: the one exception type for it, printed as one line without a traceback, and the
helpers that phrase the common ones (a bad choice, an unknown key)."""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Iterable, Iterator


class UserError(Exception):
    """A mistake in the user's input: printed as one line, without a traceback."""


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
            prefix = "" if section == "config" else f"{section}."
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            raise UserError(
                f"unknown option {prefix}{key}{hint}; valid options: {', '.join(valid)}"
            )


def first_line(error: BaseException, limit: int = 300) -> str:
    """An exception's first line (its type's name when it has no text), for a one-line message."""
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:limit]


@contextlib.contextmanager
def reading(what: object, hint: str = "") -> Iterator[None]:
    """Any error while loading `what` (a file or folder that may be broken: truncated, half
    written, pickled, of another kind) as one line; a UserError passes as it is."""
    try:
        yield
    except UserError:
        raise
    except Exception as error:  # noqa: BLE001 - the file's fault, whatever the library raises
        raise UserError(f"cannot load {what}: {first_line(error)}{hint}") from None
