"""Deprecated: `pyfuse.methods.learned` (renamed so that `pyfuse.adaptive`, the engine, is the only "adaptive"
module); this alias goes in the next release."""

import warnings

from .learned import (  # noqa: F401
    AdaMerging,
    AdaMergingPlusPlus,
    AdaptiveMethod,
    ConcreteAdaMerging,
    ConcreteTaskArithmetic,
    MergeResult,
    RunOptions,
    adamerging,
    adamerging_pp,
    concrete_adamerging,
    concrete_task_arithmetic,
)

warnings.warn("pyfuse.methods.adaptive is now pyfuse.methods.learned", DeprecationWarning, stacklevel=2)
