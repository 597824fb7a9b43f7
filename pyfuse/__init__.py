"""pyfuse: merge fine-tuned models into one multi-task model with Concrete subspace learning."""

from . import ops
from .adaptive import (
    RunOptions,
    Task,
    adamerging,
    adamerging_pp,
    concrete_adamerging,
    concrete_task_arithmetic,
)
from .layout import FlatLayout
from .merge import merge
from .taskvectors import TaskVectors

__all__ = ["FlatLayout", "TaskVectors", "merge", "ops"]
__all__ += ["RunOptions", "Task", "adamerging", "adamerging_pp", "concrete_adamerging", "concrete_task_arithmetic"]
__version__ = "0.1.0"
