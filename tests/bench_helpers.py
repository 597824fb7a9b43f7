"""Loading a script of benchmarks/ as a module, as `python benchmarks/NAME.py` would run it."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def load_benchmark(stem: str) -> ModuleType:
    """benchmarks/STEM.py as the module `STEM`, registered once (a dataclass in it looks its module up by name;
    its sibling imports, e.g. `common`, resolve from benchmarks/)."""
    if stem not in sys.modules:
        if str(BENCH) not in sys.path:
            sys.path.insert(0, str(BENCH))
        spec = importlib.util.spec_from_file_location(stem, BENCH / f"{stem}.py")
        sys.modules[stem] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[stem])
    return sys.modules[stem]
