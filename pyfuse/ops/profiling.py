"""NVTX ranges in the "pyfuse" domain, so Nsight shows the op, the loop and the engine by phase.

Without a profiler the ranges cost a function call. `timed_range` is the one helper that both opens a range
and times it, for code that reports its phases' seconds as well (the merge engine, the bi-level loop).
`record_ranges` lets a test (or a user without Nsight) see which ranges a piece of code opens and how they
nest: callers import `nvtx_range` directly, so the recording hook lives here rather than in a wrapper.
docs/profiling.md lists every range name.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator, MutableMapping

try:
    import nvtx
except ImportError:  # nvtx is a dependency, but profiling must never be what breaks a merge
    nvtx = None

DOMAIN = "pyfuse"

_recorders: list[RangeRecorder] = []


class RangeRecorder:
    """The ranges opened while it is active, each as its path of enclosing ranges on the same thread
    (NVTX ranges nest per thread), e.g. `("adaptive.outer_step", "adaptive.inner_step")`, in opening order."""

    def __init__(self) -> None:
        self.paths: list[tuple[str, ...]] = []
        self._stacks = threading.local()
        self._lock = threading.Lock()

    @property
    def names(self) -> set[str]:
        """Every range name opened at least once."""
        return {path[-1] for path in self.paths}

    def _push(self, message: str) -> None:
        stack = self._stacks.__dict__.setdefault("stack", [])
        stack.append(message)
        with self._lock:
            self.paths.append(tuple(stack))

    def _pop(self) -> None:
        self._stacks.stack.pop()


@contextlib.contextmanager
def record_ranges() -> Iterator[RangeRecorder]:
    """Record every `nvtx_range` opened inside the block, on any thread."""
    recorder = RangeRecorder()
    _recorders.append(recorder)
    try:
        yield recorder
    finally:
        _recorders.remove(recorder)


@contextlib.contextmanager
def _recorded(message: str, recorders: list[RangeRecorder]) -> Iterator[None]:
    for recorder in recorders:
        recorder._push(message)
    try:
        with nvtx.annotate(message, domain=DOMAIN) if nvtx is not None else contextlib.nullcontext():
            yield
    finally:
        for recorder in recorders:
            recorder._pop()


def nvtx_range(message: str):
    """A context manager marking `message` in the "pyfuse" NVTX domain."""
    if _recorders:
        return _recorded(message, list(_recorders))
    if nvtx is None:
        return contextlib.nullcontext()
    return nvtx.annotate(message, domain=DOMAIN)


@contextlib.contextmanager
def timed_range(message: str, seconds: MutableMapping[str, float] | None = None,
                key: str | None = None) -> Iterator[None]:
    """An NVTX range named `message`; its wall time is added to `seconds[key]` (default key: `message`) when a
    mapping is given."""
    start = time.perf_counter()
    try:
        with nvtx_range(message):
            yield
    finally:
        if seconds is not None:
            key = message if key is None else key
            seconds[key] = seconds.get(key, 0.0) + time.perf_counter() - start
