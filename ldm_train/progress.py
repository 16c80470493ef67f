"""Progress bars for the commands a user waits on (generate, cache_latents, the chain's check).

The loops that take the time report their steps (`tick`); a command decides whether they are shown
(`shown`), so the same sampling loop stays silent inside training (the validation grid) and shows
a bar in `python -m ldm_train.generate`:

    with progress.shown():                              # the command
        images = pipeline.generate(prompts, n)
    with progress.bar(total, "sampling", "step"):       # the loop that knows the total
        for t in progress.tick(scheduler.timesteps): ...  # the innermost loop
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from typing import TypeVar

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

T = TypeVar("T")
_SHOWN: ContextVar[bool] = ContextVar("ldm_train_progress_shown", default=False)
_BAR: ContextVar[tqdm | None] = ContextVar("ldm_train_progress_bar", default=None)


@contextlib.contextmanager
def shown() -> Iterator[None]:
    """Bars opened inside this block are drawn (to stderr, with log lines printed above them)."""
    token = _SHOWN.set(True)
    try:
        with logging_redirect_tqdm():
            yield
    finally:
        _SHOWN.reset(token)


@contextlib.contextmanager
def bar(total: float | None, desc: str, unit: str) -> Iterator[tqdm | None]:
    """A bar that tick() advances; None when not shown, or inside another bar (which counts)."""
    if not _SHOWN.get() or _BAR.get() is not None:
        yield None
        return
    with tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True) as drawn:
        token = _BAR.set(drawn)
        try:
            yield drawn
        finally:
            _BAR.reset(token)


def tick(items: Iterable[T], weight: float = 1) -> Iterator[T]:
    """The items; the open bar (if any) moves by `weight` after each."""
    drawn = _BAR.get()
    for item in items:
        yield item
        if drawn is not None:
            drawn.update(weight)
