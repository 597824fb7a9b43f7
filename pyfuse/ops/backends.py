"""The registry of backends for the fused merge op, and how `backend="auto"` picks one.

A backend is a module with the phase functions documented in `pyfuse.ops.reference`. Backends load
lazily: the C++ one may compile on first use and the Triton one imports triton, so neither costs
anything until asked for.
"""

from __future__ import annotations

import importlib
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import torch


@dataclass(frozen=True)
class Backend:
    name: str
    devices: tuple[str, ...]
    load: Callable[[], ModuleType]
    # dtypes beyond fp32 the backend computes in (only the reference runs fp64, for gradcheck)
    compute_dtypes: tuple[torch.dtype, ...] = (torch.float32,)


def _load_reference() -> ModuleType:
    from . import reference

    return reference


def _load_cpp() -> ModuleType:
    try:
        from . import cpp_backend
    except ImportError as err:
        raise BackendUnavailable(f"the C++ backend is not available: {err}") from None

    if cpp_backend.load() is None:
        raise BackendUnavailable(f"the C++ backend could not be built: {cpp_backend.load_error()}")
    return cpp_backend


def _load_triton() -> ModuleType:
    if importlib.util.find_spec("triton") is None:
        raise BackendUnavailable("the Triton backend needs the `triton` package (pip install triton)")
    return importlib.import_module("pyfuse.kernels.phases")


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run here (missing compiler, package or device)."""


BACKENDS: dict[str, Backend] = {
    "reference": Backend("reference", ("*",), _load_reference, (torch.float32, torch.float64)),
    "cpp": Backend("cpp", ("cpu",), _load_cpp),
    "triton": Backend("triton", ("cuda", "cpu"), _load_triton),
}
# What "auto" tries, per device, in order; the reference always works and ends every list.
AUTO_ORDER: dict[str, tuple[str, ...]] = {"cpu": ("cpp", "reference"), "cuda": ("triton", "reference")}

_loaded: dict[str, ModuleType] = {}
_warned: set[str] = set()


def _triton_runs_on(device: torch.device) -> bool:
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def resolve(name: str, device: torch.device) -> str:
    """The concrete backend that runs `name` ("auto" included) on `device`, loaded and ready."""
    if name == "auto":
        return _auto(device)
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {['auto', *BACKENDS]}")
    backend = BACKENDS[name]
    runs_here = "*" in backend.devices or device.type in backend.devices
    if not runs_here or (name == "triton" and not _triton_runs_on(device)):
        hint = " (set TRITON_INTERPRET=1 before importing triton to run it on the CPU)" if name == "triton" else ""
        raise BackendUnavailable(f"backend {name!r} does not run on {device.type} tensors{hint}")
    phases(name)
    return name


def phases(name: str) -> ModuleType:
    """The phase functions of backend `name` (as returned by `resolve`)."""
    if name not in _loaded:
        _loaded[name] = BACKENDS[name].load()
    return _loaded[name]


def _auto(device: torch.device) -> str:
    order = AUTO_ORDER.get(device.type, ("reference",))
    for name in order:
        try:
            return resolve(name, device)
        except BackendUnavailable as err:
            if name not in _warned:
                _warned.add(name)
                warnings.warn(f"pyfuse: {err}; falling back to the next backend", stacklevel=4)
    raise AssertionError("unreachable: the reference backend always loads")
