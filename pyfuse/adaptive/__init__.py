"""Test-time adaptive merging: AdaMerging, AdaMerging++, Concrete Task Arithmetic and Concrete AdaMerging."""

from ..task import Task, entropy_loss, evaluate_tasks
from .config import run_from_config
from .loop import (
    METHODS,
    AdaptiveLoop,
    MergeResult,
    RunOptions,
    Settings,
    adamerging,
    adamerging_pp,
    concrete_adamerging,
    concrete_task_arithmetic,
)
from .merger import EVAL_STEP, ConcreteMerger
from .report import load_report, plot_report

__all__ = [
    "EVAL_STEP",
    "METHODS",
    "AdaptiveLoop",
    "ConcreteMerger",
    "MergeResult",
    "RunOptions",
    "Settings",
    "Task",
    "adamerging",
    "adamerging_pp",
    "concrete_adamerging",
    "concrete_task_arithmetic",
    "entropy_loss",
    "evaluate_tasks",
    "load_report",
    "plot_report",
    "run_from_config",
]
