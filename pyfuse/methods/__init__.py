"""Merging methods: a registry of named classes with declared parameters, each kind answering for itself.

The interface lives in `base` (`Method`, `StaticMethod`, `Param`, the registry); data-aware kinds in `data`,
adaptive ones in `adaptive`. Importing this package registers every built-in method. A new method is one module
here (docs/README.md, "Adding a method").
"""

# the built-in methods register themselves on import
from . import (  # noqa: F401
    adaptive,
    breadcrumbs,
    concrete,
    dare,
    della,
    esm,
    fisher,
    linear,
    magmax,
    mats,
    model_stock,
    regmean,
    regmean_plusplus,
    slerp,
    subspace,
    ties,
    wudi,
)
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
