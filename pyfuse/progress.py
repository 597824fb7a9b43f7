"""The one progress bar every long loop shows: tqdm on a terminal, sparse (or silent) when piped.

On a terminal tqdm redraws one line in place. Written to a pipe or a log file every redraw becomes a
line of its own, and a transient bar (`leave=False`) cannot erase itself, so a CI log fills with `0%`
lines of passes that took a second. When the bar's stream is not a terminal, transient bars are not
shown at all, and the others appear only once they have run for `PIPED_INTERVAL` seconds and then at
most once per interval, with their final state on closing.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import IO, Any, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")

PIPED_INTERVAL = 60.0
"""Seconds between the lines of a bar whose stream is not a terminal (and before its first line)."""


def is_terminal(stream: IO[str] | None) -> bool:
    """True when `stream` (None: sys.stderr, tqdm's default) is an interactive terminal."""
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


class _Bar(tqdm):
    """tqdm whose `set_postfix` waits for the bar's next (throttled) redraw: tqdm's default redraws at once,
    which piped would print a line per training step (a loss shown at every step)."""

    def set_postfix(self, ordered_dict: Any = None, refresh: bool = False, **kwargs: Any) -> None:
        super().set_postfix(ordered_dict, refresh=refresh, **kwargs)


def progress_bar(iterable: Iterable[T] | None = None, *, disable: bool = False, **kwargs: Any) -> tqdm:
    """`tqdm(iterable, **kwargs)`, sparse when its stream (`file=`, default stderr) is not a terminal.

    Piped, a bar with `leave=False` is disabled, and the others draw their first line after
    `PIPED_INTERVAL` seconds (quick loops print nothing), then at most once per interval.
    """
    if not disable and not is_terminal(kwargs.get("file")):
        if kwargs.get("leave", True) is False:
            disable = True
        else:
            kwargs.setdefault("mininterval", PIPED_INTERVAL)
            kwargs.setdefault("delay", PIPED_INTERVAL)
    return _Bar(iterable, disable=disable, **kwargs)
