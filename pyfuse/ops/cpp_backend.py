"""The C++ CPU backend: loads the compiled extension and forwards the phase functions to it.

The extension (`csrc/concrete_merge.cpp`, `csrc/lora_concrete_merge.cpp` and their headers) is found in this order:

1. `pyfuse._C`, built by `pip install --no-build-isolation -e .` (setup.py), unless csrc/ in a source
   checkout is newer than it;
2. a JIT build of the csrc/ sources with `torch.utils.cpp_extension.load`, cached per user under
   `$PYFUSE_CACHE_DIR` or `$XDG_CACHE_HOME/pyfuse` (default `~/.cache/pyfuse`), in a directory named
   after a hash of the sources, the flags, the torch version and the Python ABI.

`load()` returns the module or None (never raises); `load_error()` says why it is None. The phase
functions have exactly the signatures of `pyfuse.ops.reference` (see its docstring) and raise
RuntimeError when the extension is unavailable. Inputs are expected validated and contiguous; the
extension re-checks only shapes, dtypes and offsets (cheaply).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import threading
from pathlib import Path
from types import ModuleType

_EXPECTED = ("mask_sums", "merge_apply", "backward_accumulate", "backward_logits", "uniform", "lora_merge_apply",
             "lora_backward_accumulate")
_JIT_NAME = "pyfuse_cpp"

_lock = threading.Lock()
_attempted = False
_module: ModuleType | None = None
_error: str | None = None


def _repo_root() -> Path:
    # pyfuse/ops/cpp_backend.py -> the directory holding pyfuse/ (and csrc/ in a source checkout)
    return Path(__file__).resolve().parent.parent.parent


def _has_api(mod: ModuleType) -> bool:
    return all(hasattr(mod, name) for name in _EXPECTED)


def _stale(mod: ModuleType) -> bool:
    """True if csrc/ (in a source checkout) was edited after the prebuilt `mod` was compiled."""
    binary = getattr(mod, "__file__", None)
    csrc = _repo_root() / "csrc"
    if not binary or not csrc.is_dir():
        return False
    try:
        built = os.path.getmtime(binary)
        newest = max((p.stat().st_mtime for p in csrc.iterdir() if p.suffix in (".cpp", ".h")), default=0.0)
    except OSError:
        return False
    return newest > built


def _cache_root() -> Path:
    explicit = os.environ.get("PYFUSE_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "pyfuse"


def _build_dir(sources: list[Path], flags: list[str], ldflags: list[str]) -> Path:
    import torch

    digest = hashlib.sha256()
    csrc = sources[0].parent
    # every source and header: a change to philox.h must trigger a rebuild too
    files = sorted({*sources, *csrc.glob("*.h"), *csrc.glob("*.cpp")})
    for path in files:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    for part in (flags, ldflags, [torch.__version__, sys.version, sys.platform]):
        digest.update(repr(part).encode())
    return _cache_root() / f"cpp-{digest.hexdigest()[:16]}"


def _jit_build() -> ModuleType:
    from pyfuse import _build

    root = _repo_root()
    sources = [root / src for src in _build.CPP_SOURCES]
    missing = [str(p) for p in sources if not p.is_file()]
    if missing:
        raise RuntimeError(f"C++ sources not found (not a source checkout?): {', '.join(missing)}")
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        raise RuntimeError(f"no C++ compiler: {cxx!r} is not on PATH")

    from torch.utils import cpp_extension

    flags = list(_build.CPP_FLAGS)
    ldflags = list(_build.CPP_LINK_FLAGS)
    build_dir = _build_dir(sources, flags, ldflags)
    build_dir.mkdir(parents=True, exist_ok=True)
    return cpp_extension.load(
        name=_JIT_NAME,
        sources=[str(p) for p in sources],
        extra_cflags=flags,
        extra_ldflags=ldflags,
        build_directory=str(build_dir),
        verbose=False,
    )


def load() -> ModuleType | None:
    """The extension module, or None if it is unavailable (see `load_error()`); cached, never raises."""
    global _attempted, _module, _error
    if _attempted:
        return _module
    with _lock:
        if _attempted:
            return _module
        reasons = []
        try:
            from pyfuse import _C  # built by setup.py

            if not _has_api(_C):
                reasons.append("pyfuse._C is stale (missing functions); rebuild with pip install -e .")
            elif _stale(_C):
                reasons.append("pyfuse._C is older than csrc/; using a JIT build of the current sources")
            else:
                _module = _C
        except Exception as exc:  # ImportError, or a broken/ABI-mismatched binary
            reasons.append(f"pyfuse._C not importable ({type(exc).__name__}: {exc})")
        if _module is None:
            try:
                mod = _jit_build()
                if not _has_api(mod):
                    raise RuntimeError("JIT-built module lacks the expected functions")
                _module = mod
            except Exception as exc:  # compiler missing, compile error, ninja missing, ...
                msg = str(exc).strip()
                if len(msg) > 4000:
                    msg = msg[:2000] + "\n...\n" + msg[-2000:]
                reasons.append(f"JIT build failed ({type(exc).__name__}: {msg})")
        _error = None if _module is not None else "; ".join(reasons)
        _attempted = True
        return _module


def load_error() -> str | None:
    """Why `load()` returned None (None if it has not been tried or succeeded)."""
    return _error


def available() -> bool:
    return load() is not None


def _ext() -> ModuleType:
    mod = load()
    if mod is None:
        raise RuntimeError(f"pyfuse C++ backend unavailable: {_error}")
    return mod


def mask_sums(logits, offsets, seed, step, temperature, mode, m_out, start=0):
    return _ext().mask_sums(logits, offsets, int(seed), int(step), float(temperature), int(mode), m_out, int(start))


def merge_apply(base, task_vectors, weights, offsets, seg_scale, m_inout):
    _ext().merge_apply(base, task_vectors, weights, offsets, seg_scale, m_inout)


def backward_accumulate(
    grad_out, task_vectors, logits, weights, offsets, seg_scale, seed, step, temperature, mode, ga_out, start=0
):
    return _ext().backward_accumulate(
        grad_out,
        task_vectors,
        logits,
        weights,
        offsets,
        seg_scale,
        int(seed),
        int(step),
        float(temperature),
        int(mode),
        ga_out,
        int(start),
    )


def backward_logits(ga_inout, logits, offsets, seg_scale, seg_corr, seed, step, temperature, start=0):
    _ext().backward_logits(ga_inout, logits, offsets, seg_scale, seg_corr, int(seed), int(step), float(temperature),
                           int(start))


def lora_merge_apply(base, left, right, rows, comp_offsets, coef, offsets, seg_scale, m_inout):
    _ext().lora_merge_apply(base, left, right, rows, comp_offsets, coef, offsets, seg_scale, m_inout)


def lora_backward_accumulate(
    grad_out, left, right, rows, comp_offsets, coef, logits, offsets, seed, step, temperature, mode, ga_out,
    need_ga=True, need_dots=True, start=0,
):
    return _ext().lora_backward_accumulate(
        grad_out, left, right, rows, comp_offsets, coef, logits, offsets, int(seed), int(step), float(temperature),
        int(mode), ga_out, bool(need_ga), bool(need_dots), int(start),
    )


def uniform(seed, step, start, count):
    """The clamped uniforms u_j for j in [start, start + count) (same as philox.concrete_uniform)."""
    return _ext().uniform(int(seed), int(step), int(start), int(count))
