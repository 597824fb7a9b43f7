"""NVTX ranges in the "pyfuse" domain, so Nsight shows the op, the loop and the engine by phase.

Without a profiler the ranges cost a function call. `timed_range` is the one helper that both opens a range
and times it, for code that reports its phases' seconds as well (the merge engine, the bi-level loop).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, MutableMapping

try:
    import nvtx
except ImportError:  # nvtx is a dependency, but profiling must never be what breaks a merge
    nvtx = None

DOMAIN = "pyfuse"


def nvtx_range(message: str):
    """A context manager marking `message` in the "pyfuse" NVTX domain."""
    if nvtx is None:
        return contextlib.nullcontext()
    return nvtx.annotate(message, domain=DOMAIN)


@contextlib.contextmanager
def timed_range(message: str, seconds: MutableMapping[str, float] | None = None) -> Iterator[None]:
    """An NVTX range named `message`; its wall time is added to `seconds[message]` when a mapping is given."""
    start = time.perf_counter()
    try:
        with nvtx_range(message):
            yield
    finally:
        if seconds is not None:
            seconds[message] = seconds.get(message, 0.0) + time.perf_counter() - start
