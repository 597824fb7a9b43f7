"""pyfuse: merge fine-tuned models into one multi-task model with Concrete subspace learning."""

from . import _kernels_path, ops
from ._version import __version__  # noqa: F401  (pyproject reads it from here)
from .layout import FlatLayout
from .merge import merge, merge_to_dir
from .methods.learned import (
    RunOptions,
    adamerging,
    adamerging_pp,
    concrete_adamerging,
    concrete_task_arithmetic,
    concrete_tsvm,
)
from .stats import Statistics, collect_statistics
from .task import Task
from .taskvector_merge import merge_task_vectors
from .taskvectors import TaskVectors

__all__ = ["FlatLayout", "Statistics", "TaskVectors", "collect_statistics", "merge", "merge_task_vectors",
           "merge_to_dir", "ops"]
__all__ += ["RunOptions", "Task", "adamerging", "adamerging_pp", "concrete_adamerging", "concrete_task_arithmetic",
            "concrete_tsvm"]

_kernels_path.register()  # the Triton sources as pyfuse.kernels (see _kernels_path)
