"""The engine of test-time adaptive merging: the bi-level loop, the Concrete merger, checkpoints and reports.

The methods that run it (adamerging, adamerging++, concrete_task_arithmetic, concrete_adamerging, concrete_tsvm)
are registered in `pyfuse.methods.learned`, which hands the loop the per-task vectors they merge
(`pyfuse.methods.vector_sources`); `pyfuse.config` runs them from a config file.
"""

from ..task import Task, entropy_loss, evaluate_tasks
from .loop import AdaptiveLoop, MergeResult, RunOptions, Settings
from .merger import EVAL_STEP, ConcreteMerger
from .report import load_report, plot_report

__all__ = [
    "EVAL_STEP",
    "AdaptiveLoop",
    "ConcreteMerger",
    "MergeResult",
    "RunOptions",
    "Settings",
    "Task",
    "entropy_loss",
    "evaluate_tasks",
    "load_report",
    "plot_report",
]
