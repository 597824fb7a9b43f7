"""The engine's entry points: `merge` (the result in memory) and `merge_to_dir` (streamed into a directory), each
a `plan_merge` and then its run."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from ..io.atomic import check_output_dir
from ..methods import Method
from ..stats import Statistics
from ..task import Task
from .plan import input_paths, plan_merge
from .write import DEFAULT_SHARD_SIZE

__all__ = ["merge", "merge_to_dir"]


def merge(method: str | Method, base, finetuned: list, *, dtype: str | torch.dtype | None = None,
          device: str | torch.device = "cpu", threads: int | None = None, progress: bool = False,
          statistics: Sequence[Statistics | str | os.PathLike] | None = None, tasks: Sequence[Task] | None = None,
          model: torch.nn.Module | None = None, **params: Any) -> dict[str, torch.Tensor]:
    """Merge fine-tuned models into one state dict with a static or a data-aware method.

    Args:
        method: "average", "task_arithmetic", "ties", "dare" or "concrete" (see `pyfuse.methods`), or a
            data-aware method such as "fisher" or "regmean", which needs `statistics`, or "regmean++", which
            needs `tasks` and runs the model.
        base: the pre-trained model: a state dict, an `nn.Module`, or a path (a safetensors file, a
            sharded safetensors directory with its index, or a Hugging Face model directory).
        finetuned: the fine-tuned models, in any of the same forms.
        dtype: dtype of the merged tensors (default: the base's); the arithmetic is fp32 regardless.
        device: where the arithmetic runs ("cpu" or "cuda"); the result is on the CPU.
        threads: chunks merged at once (default: torch's CPU threads; torch runs single-threaded meanwhile).
        statistics: data-aware methods only: one `pyfuse.stats.Statistics` (or a file saved by it) per
            fine-tuned model, in the same order.
        tasks: regmean++ only: one `pyfuse.Task` per fine-tuned model, in the same order, whose batches the
            models run on.
        model: regmean++ only: the architecture (its values are replaced by the base's); default: `base`,
            which must then be an `nn.Module`.
        **params: the method's parameters, e.g. `density=0.5` for TIES.

    Returns:
        Every tensor of the base, merged where floating, carried unchanged otherwise. Inputs are never modified.
    """
    return plan_merge(method, base, finetuned, dtype=dtype, device=device, threads=threads, statistics=statistics,
                      tasks=tasks, model=model, **params).state_dict(progress)


def merge_to_dir(method: str | Method, base, finetuned: list, out_dir: str | os.PathLike, *,
                 dtype: str | torch.dtype | None = None, device: str | torch.device = "cpu",
                 threads: int | None = None, force: bool = False, shard_size: int | str = DEFAULT_SHARD_SIZE,
                 hash_inputs: bool = True, progress: bool = False,
                 statistics: Sequence[Statistics | str | os.PathLike] | None = None,
                 tasks: Sequence[Task] | None = None, model: torch.nn.Module | None = None,
                 **params: Any) -> dict[str, Any]:
    """Merge like `merge`, streaming the result into `out_dir` in bounded memory; returns the merge report.

    `out_dir` receives sharded safetensors with their index, the base's config and other small files
    (when the base is a model directory) and `merge_report.json`. It is written under a temporary name
    and renamed when complete; an existing `out_dir` is replaced only with `force=True`.
    """
    # the output location first, before any input is opened (path parameters are checked again by `write`)
    check_output_dir(out_dir, force, input_paths([base, *finetuned, *(statistics or ())]))
    plan = plan_merge(method, base, finetuned, dtype=dtype, device=device, threads=threads, statistics=statistics,
                      tasks=tasks, model=model, **params)
    return plan.write(out_dir, force=force, shard_size=shard_size, hash_inputs=hash_inputs, progress=progress)
