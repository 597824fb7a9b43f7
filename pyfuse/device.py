"""Where a run computes: one device for every merge kind, and what goes onto it.

`resolve_device` turns the user's `device` ("cpu", "cuda", "cuda:1") into a `torch.device`, refusing a CUDA
device torch cannot see; under torchrun, a bare "cuda" is the GPU of this process's `LOCAL_RANK`. An adaptive
run puts the base, the task vectors (dense or LoRA factors), the model, and every batch its tasks hand out on
that device (`place_run`); the mask logits, coefficients and optimiser state are created next to the task
vectors. Statistics collection and regmean++ move their model and batches there the same way (`OnDevice`); a
data-aware merge reads each tensor and statistic onto it as it gets to it (`SourceTensors`, `Statistics.to`).
Merged tensors come back to the CPU, where they are written. `autocast` runs the model's forward in reduced
precision where asked; the fused merge op is never inside it, so it keeps its fp32 accumulation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .task import Task
    from .taskvectors import TaskVectors

__all__ = ["AUTOCAST_DTYPES", "autocast", "place_run", "resolve_device", "tasks_on_device", "to_device",
           "torch_threads"]

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
                   "float16": torch.float16}


def resolve_device(device: str | torch.device) -> torch.device:
    """The `torch.device` a run computes on: cpu or cuda (a bare "cuda" under torchrun is LOCAL_RANK's GPU)."""
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be cpu, cuda or cuda:N, got {device!r}") from None
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu, cuda or cuda:N, got {device!r}")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {resolved} requested, but torch reports no CUDA device")
        if resolved.index is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            resolved = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise RuntimeError(f"device {resolved} requested, but torch sees {torch.cuda.device_count()} CUDA "
                               "device(s)")
    return resolved


def autocast_dtype(name: str | None) -> torch.dtype | None:
    """The reduced precision named by `name` ("bf16", "fp16"), or None for none."""
    if name is None:
        return None
    if name not in AUTOCAST_DTYPES:
        raise ValueError(f"autocast must be one of {sorted(AUTOCAST_DTYPES)} or None, got {name!r}")
    return AUTOCAST_DTYPES[name]


def autocast(device: torch.device, name: str | None) -> contextlib.AbstractContextManager:
    """The model's forward in the precision `name` on `device` (a no-op for None)."""
    dtype = autocast_dtype(name)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def to_device(value: Any, device: torch.device) -> Any:
    """`value` with every tensor inside it (nested in mappings, lists, tuples and named tuples, or any object
    with its own `.to`, such as a tokenizer's BatchEncoding) on `device`; other values unchanged."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if callable(getattr(value, "to", None)) and not isinstance(value, torch.nn.Module):
        return value.to(device)
    if isinstance(value, Mapping):
        return {key: to_device(item, device) for key, item in value.items()}
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(to_device(item, device) for item in value))
    if isinstance(value, (list, tuple)):
        return type(value)(to_device(item, device) for item in value)
    return value


@dataclasses.dataclass(frozen=True)
class OnDevice(Iterable):
    """An iterable whose items (batches, or (batch, labels) pairs) come out on `device`; iterated afresh each
    time, like the iterable it wraps."""

    items: Iterable
    device: torch.device

    def __iter__(self) -> Iterator[Any]:
        return (to_device(item, self.device) for item in self.items)


def place_run(model: torch.nn.Module, task_vectors: TaskVectors, tasks: Iterable[Task],
              device: str | torch.device) -> tuple[TaskVectors, list[Task]]:
    """Move an adaptive run onto `device`: the model (in place; its parameter values are never read, its
    buffers outside the state dict are), the base and task vectors, and the tasks' batches and test data as
    they are drawn. A task's own tensors (a classifier head inside its `logits`) must already be there."""
    device = torch.device(device)
    model.to(device)
    return task_vectors.to(device), tasks_on_device(tasks, device)


def tasks_on_device(tasks: Iterable[Task], device: torch.device) -> list[Task]:
    """The same tasks with their batches and test data handed out on `device`."""
    return [dataclasses.replace(task, batches=OnDevice(task.batches, device),
                                test_data=None if task.test_data is None else OnDevice(task.test_data, device))
            for task in tasks]


@contextlib.contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """torch's CPU threads set to `count` for the block (unchanged for None)."""
    if count is None:
        yield
        return
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"threads must be a positive integer, got {count!r}")
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)
