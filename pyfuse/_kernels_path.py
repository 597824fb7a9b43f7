"""Where `pyfuse.kernels` (the Triton sources) comes from.

The sources live in the repository's top-level `kernels/` folder, which deliberately has no `__init__.py`:
a regular package there would be imported as a top-level `kernels` whenever a checkout's root is on
`sys.path` (`python -m pyfuse`, pytest), shadowing Hugging Face's distribution of that name, which
transformers imports. Without it, Python gives the name `kernels` to any installed package first.

A wheel installs the folder as `pyfuse/kernels/`, a namespace subpackage Python finds by itself. A source
checkout, editable install or not, keeps it beside `pyfuse/`, where the import system cannot see it as a
subpackage; `register()` then makes `pyfuse.kernels` a package over that folder.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys

NAME = "pyfuse.kernels"


def register() -> None:
    """Make `pyfuse.kernels` importable; a no-op where it already is (installed wheel, second call)."""
    if NAME in sys.modules:
        return
    package_dir = os.path.dirname(os.path.abspath(__file__))
    installed = os.path.join(package_dir, "kernels")
    if os.path.isdir(installed):
        return  # a wheel: the namespace subpackage is found by the ordinary import system
    checkout = os.path.join(os.path.dirname(package_dir), "kernels")
    if not os.path.isfile(os.path.join(checkout, "concrete_merge.py")):
        return  # neither layout: importing pyfuse.kernels fails with Python's own message
    spec = importlib.machinery.ModuleSpec(NAME, None, is_package=True)
    spec.submodule_search_locations = [checkout]
    module = importlib.util.module_from_spec(spec)
    sys.modules[NAME] = module
    sys.modules["pyfuse"].kernels = module
