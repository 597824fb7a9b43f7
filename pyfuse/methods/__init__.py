"""Merging methods: a registry of named classes with declared parameters, each kind answering for itself.

The interface lives in `base` (`Method`, `StaticMethod`, `Param`, the registry); the data-aware kinds in
`data_aware`, the methods learned at test time in `learned` (they run the engine in `pyfuse.adaptive`).
Importing this package registers every built-in method. A new method is one module here (docs/development.md,
"Adding a method").
"""

import importlib
import pkgutil

from .base import (
    REQUIRED,
    TEMPERATURE,
    WEIGHTS,
    Chunk,
    MergeContext,
    Method,
    Param,
    StaticMethod,
    available_methods,
    boolean,
    check_names,
    choice,
    create_method,
    get_method,
    integer,
    number,
    numbers,
    positive,
    refuse_tasks,
    register,
    resolve_params,
    tensor_names,
)

__all__ = [
    "Chunk", "MergeContext", "Method", "Param", "REQUIRED", "StaticMethod",
    "available_methods", "create_method", "get_method", "register", "refuse_tasks",
]
__all__ += ["TEMPERATURE", "WEIGHTS", "boolean", "check_names", "choice", "integer", "number", "numbers", "positive",
            "resolve_params", "tensor_names"]

_DEPRECATED_ALIASES = ("adaptive", "data")  # old module names, imported only by whoever still names them

# Every module here registers its methods on import, so a new method is one new file in this folder.
for _module in pkgutil.iter_modules(__path__):
    if _module.name not in _DEPRECATED_ALIASES:
        importlib.import_module(f"{__name__}.{_module.name}")
