"""NVTX ranges in the "pyfuse" domain, so Nsight shows the op and its phases; no-ops without a profiler."""

from __future__ import annotations

import contextlib

try:
    import nvtx
except ImportError:  # nvtx is a dependency, but profiling must never be what breaks a merge
    nvtx = None


def nvtx_range(message: str):
    """A context manager marking `message` in the "pyfuse" NVTX domain."""
    if nvtx is None:
        return contextlib.nullcontext()
    return nvtx.annotate(message, domain="pyfuse")
