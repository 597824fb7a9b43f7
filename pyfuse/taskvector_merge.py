"""`merge_task_vectors`: a data-free merge of a `TaskVectors` buffer, dense or kept as LoRA factors.

The linear methods (`average`, `task_arithmetic`) and `concrete` are one call of the fused op over the whole
flat buffer, so factored task vectors stay factored (the op forms `B @ A` tile by tile). Every other method
(TIES, DARE, ... and the data-aware ones, given `statistics=`) runs on the streaming engine of `pyfuse.merge`,
which reads a tensor at a time: factored task vectors are densified one tensor at a time as the engine reads
it (n x that tensor's size in fp32 at once, never `[n, D]`), each pass over the model forming them again.
The engine is fed `base + tau` and takes the difference back, so those methods see tau to fp32 rounding.
"""

from __future__ import annotations

from typing import Any

import torch

from .engine import merge
from .io.sources import TensorSource
from .methods import create_method, get_method
from .ops import concrete_merge
from .taskvectors import TaskVectors

__all__ = ["merge_task_vectors", "task_sources"]


def merge_task_vectors(task_vectors: TaskVectors, method: str, *, backend: str = "auto", **params: Any
                       ) -> dict[str, torch.Tensor]:
    """The merged model's state dict (fp32 merged tensors, carried tensors as they are).

    `method` and `params` as in `pyfuse.merge` (e.g. `method="task_arithmetic", scaling=0.3`); `backend` picks
    the fused op's backend for the linear methods and `concrete`; other methods take `threads`, `progress` and
    `statistics` as `pyfuse.merge` does.
    """
    if not isinstance(task_vectors, TaskVectors):
        raise TypeError(f"task_vectors must be TaskVectors, got {type(task_vectors).__name__}")
    layout = task_vectors.layout
    if not get_method(method).fused:
        models = task_sources(task_vectors)
        merged = merge(method, models[0], models[1:], dtype=torch.float32, **params)
        return {**merged, **task_vectors.carried}
    instance = create_method(method, **params)
    instance.bind(layout, task_vectors.n)
    device = task_vectors.base.device
    logits, options = instance.fused_mask(device, layout.numel)
    with torch.no_grad():
        flat = concrete_merge(task_vectors.base, task_vectors.vectors, logits, instance.coefficients().to(device),
                              layout.offsets.to(device), backend=backend, **options)
    return task_vectors.state_dict(flat)


def task_sources(task_vectors: TaskVectors) -> list[TensorSource]:
    """The base and the n fine-tuned models (`base + tau_i`) over the layout, as lazy fp32 sources.

    A fine-tuned tensor is formed when read; the n task vectors of the tensor last read are kept, since the
    engine reads the base and then every model's same tensor in turn.
    """
    layout = task_vectors.layout
    specs = {name: (shape, torch.float32) for name, shape in zip(layout.names, layout.shapes)}
    index = {name: s for s, name in enumerate(layout.names)}
    views = layout.unflatten(task_vectors.base)
    last: dict[str, Any] = {}

    def finetuned(row: int):
        def read(key: str) -> torch.Tensor:
            if last.get("key") != key:
                last.update(key=key, deltas=task_vectors.segment_deltas(index[key]))
            return (views[key].reshape(-1) + last["deltas"][row]).view(views[key].shape)

        return read

    base = TensorSource("base of the task vectors", specs, lambda key: views[key])
    tasks = [TensorSource(f"task {name!r}", specs, finetuned(row)) for row, name in enumerate(task_vectors.names)]
    return [base, *tasks]
