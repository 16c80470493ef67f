"""What one value may be, declared once and checked into one line that names the key, the value and
what is allowed ("data.batch_size=0 must be an integer >= 1"). The config tree's table
(ldm_train.schema) and the command-line options (ldm_train.cli) are written with these.

Written here rather than with pydantic: the config stays Hydra's (its `_target_` nodes and
interpolations untouched), a rule is one line of a flat table keyed by the config's dotted names,
and the message is ours, one line in the words the README uses; a pydantic model per config
section would mirror the tree and still need its errors rephrased.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ldm_train.errors import UserError

SEED_MAX = 2**32 - 1  # Lightning's seed_everything takes numpy's uint32 seeds


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


class Rule:
    """A rule: `allowed` says what it takes; check(key, value) returns the value or raises."""

    null: bool = False

    @property
    def allowed(self) -> str:
        raise NotImplementedError

    def fits(self, value: Any) -> bool:
        raise NotImplementedError

    def check(self, key: str, value: Any) -> Any:
        if value is None and self.null:
            return value
        if not self.fits(value):
            raise UserError(self.message(key, "null" if value is None else repr(value)))
        return value

    def message(self, key: str, shown: str) -> str:
        return f"{key}={shown} must be {self.allowed}{' or null' if self.null else ''}"

    def parse(self, text: str) -> Any:
        """A command line's text as this rule's kind of value (checked by the caller)."""
        return text


def convert(kind: type, text: str) -> Any:
    """The text as a `kind`, or the text itself (then the rule says what it must be)."""
    try:
        return kind(text)
    except ValueError:
        return text


def bounds(
    low: float | None, high: float | None, low_open: bool = False, high_open: bool = False
) -> str:
    if low is not None and high is not None and not (low_open or high_open):
        return f"from {low} to {high}"
    parts = [] if low is None else [f"{'>' if low_open else '>='} {low}"]
    parts += [] if high is None else [f"{'<' if high_open else '<='} {high}"]
    return " and ".join(parts)


@dataclass(frozen=True)
class Int(Rule):
    low: int | None = None
    high: int | None = None
    null: bool = False
    hint: str = ""

    @property
    def allowed(self) -> str:
        hint = f"; {self.hint}" if self.hint else ""
        return f"an integer {bounds(self.low, self.high)}".rstrip() + hint

    def fits(self, value: Any) -> bool:
        return (
            isinstance(value, int)
            and not isinstance(value, bool)
            and (self.low is None or value >= self.low)
            and (self.high is None or value <= self.high)
        )

    parse = staticmethod(lambda text: convert(int, text))


@dataclass(frozen=True)
class Real(Rule):
    """A finite number (nan and inf are refused) within the bounds (each excluded if open)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    null: bool = False
    high_open: bool = False

    @property
    def allowed(self) -> str:
        shown = bounds(self.low, self.high, self.low_open, self.high_open)
        return f"a finite number {shown}".rstrip()

    def fits(self, value: Any) -> bool:
        if not is_number(value) or not math.isfinite(value):
            return False
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    parse = staticmethod(lambda text: convert(float, text))


@dataclass(frozen=True)
class Choice(Rule):
    """One of a fixed set (a callable giving it: the set lives where its meaning does)."""

    values: Sequence[Any] | Callable[[], Sequence[Any]] = ()
    null: bool = False

    @property
    def choices(self) -> list[Any]:
        return list(self.values() if callable(self.values) else self.values)

    @property
    def allowed(self) -> str:
        return "one of: " + ", ".join(dict.fromkeys(map(str, self.choices)))

    def fits(self, value: Any) -> bool:
        return value in self.choices and not isinstance(value, bool | float)

    def message(self, key: str, shown: str) -> str:  # as errors.check_choice says it
        null = ", null" if self.null else ""
        names = ", ".join(dict.fromkeys(map(str, self.choices)))  # 32 and "32": one name
        return f"{key}={shown} is not valid; choose one of: {names}{null}"


@dataclass(frozen=True)
class Flag(Rule):
    null: bool = False
    allowed = "true or false"

    def fits(self, value: Any) -> bool:
        return isinstance(value, bool)


@dataclass(frozen=True)
class Text(Rule):
    """A non-empty string; plain: a name that stays inside the folder it names a place in."""

    null: bool = False
    plain: bool = False

    @property
    def allowed(self) -> str:
        return "a name without '..' or a leading '/'" if self.plain else "a non-empty string"

    def fits(self, value: Any) -> bool:
        if not isinstance(value, str) or not value.strip():
            return False
        return not self.plain or not (value.startswith("/") or ".." in value.split("/"))


@dataclass(frozen=True)
class Texts(Rule):
    """A string or a non-empty list of strings (shard URLs, keys); single=False: the list only."""

    null: bool = False
    single: bool = True

    @property
    def allowed(self) -> str:
        return ("a string or " if self.single else "") + "a non-empty list of strings"

    def fits(self, value: Any) -> bool:
        if isinstance(value, str):
            return self.single and bool(value.strip())
        return (
            isinstance(value, list | tuple) and bool(value) and all(Text().fits(v) for v in value)
        )


@dataclass(frozen=True)
class Numbers(Rule):
    """A list of `count` numbers, each fitting `each` (e.g. Adam's betas)."""

    each: Rule = Real()
    count: int = 2
    null: bool = False

    @property
    def allowed(self) -> str:
        return f"a list of {self.count}, each {self.each.allowed}"

    def fits(self, value: Any) -> bool:
        return (
            isinstance(value, list | tuple)
            and len(value) == self.count
            and all(self.each.fits(v) for v in value)
        )


@dataclass(frozen=True)
class Either(Rule):
    """Any of the rules (e.g. trainer.limit_val_batches: a count or a fraction)."""

    rules: tuple[Rule, ...] = ()
    null: bool = False

    @property
    def allowed(self) -> str:
        return " or ".join(rule.allowed for rule in self.rules)

    def fits(self, value: Any) -> bool:
        return any(rule.fits(value) for rule in self.rules)

    def parse(self, text: str) -> Any:
        parsed = [rule.parse(text) for rule in self.rules]
        return next((v for v, r in zip(parsed, self.rules, strict=True) if r.fits(v)), text)


SEED = Int(0, SEED_MAX)


def typed(rule: Rule) -> Callable[[str], Any]:
    """An argparse type: the text parsed and checked by `rule`."""

    def convert(text: str) -> Any:
        value = rule.parse(text)
        if not rule.fits(value):
            raise argparse.ArgumentTypeError(f"{text!r} must be {rule.allowed}")
        return value

    convert.__name__ = type(rule).__name__.lower()
    return convert


class Parser(argparse.ArgumentParser):
    """argparse, with its errors in one line (no usage block above them), exit code 2."""

    def __init__(self, prog: str, doc: str | None) -> None:
        super().__init__(
            prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
        )

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (--help lists the options)\n")
