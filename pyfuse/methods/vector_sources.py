"""The per-task vectors an adaptive method merges: the raw task vectors, or those another method produces.

Concrete Task Arithmetic and Concrete AdaMerging take `vectors: raw | ties | tsv` (AdaMerging++ is AdaMerging
over `ties`); the loop then learns its mask (and coefficients) over those vectors through the same fused op:

- `raw`: fine-tuned minus base (Tang et al., 2023).
- `ties`: TIES' trimmed, sign-agreeing task vectors (`sparsify.ties_trim`: one magnitude threshold per task over
  the whole model at `density`, entries against the elected sign zeroed), as AdaMerging++ merges them
  (Yang et al., 2024).
- `tsv`: TSV-M's decorrelated per-task vectors (`subspace.task_singular_parts`): per matrix, task i's block
  `U'_i diag(s_i) V'_i` of the orthonormalised stacked singular vectors, so that they sum to the TSV-M merge;
  every other tensor (and the matrices in `exclude_keys`) gets the mean task vector for each task, as
  fusion_bench's Concrete TSV-M (`ConcreteTSVMForOpenCLIP`) builds them from `TaskSingularVectorMerging` with
  `return_single_task_models` (Gargiulo et al., 2025). Matrices are decomposed in float64.

Both derived sources need the whole, dense task vectors (a threshold or an SVD over every entry).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from ..taskvectors import TaskVectors
from .base import check_names
from .sparsify import ties_trim
from .subspace import task_singular_parts

VECTOR_SOURCES = {
    "raw": ("the task vectors, fine-tuned minus base", "Tang et al., 2023"),
    "ties": ("TIES-trimmed, sign-agreeing task vectors at `density`, as AdaMerging++ merges them",
             "Yadav et al., 2023; Yang et al., 2024"),
    "tsv": ("TSV-M's decorrelated per-task vectors (other tensors and `exclude_keys`: the mean task vector), as "
            "fusion_bench's Concrete TSV-M builds them", "Gargiulo et al., 2025; fusion_bench ConcreteTSVMForOpenCLIP"),
}
"""Each `vectors` source: what it merges and the reference it follows."""

_WHY = {
    "ties": "trims the task vectors TIES-style (a top-k of every entry's magnitude over the whole model) and trains "
            "over the trimmed [n, D] buffer",
    "tsv": "decomposes every matrix's task vectors (TSV-M's SVDs) and trains over the resulting [n, D] buffer",
}


def source_help() -> str:
    """One line per source, for the `vectors` parameter's help."""
    return " | ".join(f"{name} ({what}; {reference})" for name, (what, reference) in VECTOR_SOURCES.items())


def source_vectors(task_vectors: TaskVectors, source: str, who: str, *, density: float | None = None,
                   exclude_keys: Sequence[str] = ()) -> TaskVectors:
    """The task vectors of `source` (`VECTOR_SOURCES`) in the dtype of the given ones; `who` names the caller in
    errors. The given task vectors are not changed."""
    if source == "raw":
        return task_vectors
    if source not in VECTOR_SOURCES:
        raise ValueError(f"{who}: vectors must be one of {', '.join(map(repr, VECTOR_SOURCES))}, got {source!r}")
    task_vectors.require_whole(f"{who} (its {source} vectors are computed over the whole model)")
    task_vectors.require_dense(who, _WHY[source])
    if source == "ties":
        return dataclasses.replace(task_vectors, vectors=ties_trim(task_vectors.vectors, density))
    check_names(who, "exclude_keys", exclude_keys, task_vectors.layout)
    return dataclasses.replace(task_vectors, vectors=tsv_vectors(task_vectors, exclude_keys))


def tsv_vectors(task_vectors: TaskVectors, exclude_keys: Sequence[str] = ()) -> torch.Tensor:
    """TSV-M's per-task vectors `[n, D]` (module docstring), in the dtype of `task_vectors.vectors`."""
    layout, n = task_vectors.layout, task_vectors.n
    out = torch.empty_like(task_vectors.vectors)
    for index, (name, shape) in enumerate(zip(layout.names, layout.shapes)):
        start, end = layout.span(index)
        tau = task_vectors.vectors[:, start:end].double()
        if len(shape) == 2 and name not in exclude_keys:
            out[:, start:end] = task_singular_parts(tau.view(n, *shape)).reshape(n, -1)
        else:
            out[:, start:end] = tau.mean(0)
    return out
