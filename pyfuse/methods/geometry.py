"""Angles between models, tensor by tensor: the Gram matrices SLERP, NuSLERP and Model Stock are computed from.

A tensor is cut into vectors `along` one of
- "all": the whole flattened tensor is one vector;
- "rows": vectors along the last dimension (one per row of a matrix);
- "columns": vectors along the first dimension (one per column of a matrix; one per trailing index otherwise).

`segment_grams` reads a tensor chunk by chunk (one pass) and returns, per vector, the float64 Gram matrix of
the `m` vectors a chunk yields (e.g. the two models SLERP interpolates), so that norms and dot products are
exact to float64 whatever the chunking. `CoefficientPlan` then maps each chunk entry to its vector's
per-model coefficients.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .base import Chunk, MergeContext

ALONG = ("all", "rows", "columns")


def vector_count(shape: torch.Size, along: str) -> int:
    """How many vectors a tensor shaped `shape` is cut into."""
    if along == "all" or len(shape) < 2:
        return 1
    if along == "rows":
        return shape.numel() // shape[-1]
    return shape.numel() // shape[0]


def vector_ids(shape: torch.Size, along: str, start: int, length: int, device: torch.device) -> torch.Tensor | None:
    """The vector of each of the `length` entries from flat position `start` of the tensor (None: one vector)."""
    if vector_count(shape, along) == 1:
        return None
    position = torch.arange(start, start + length, device=device)
    if along == "rows":
        return position.div_(shape[-1], rounding_mode="floor")
    return position.remainder_(shape.numel() // shape[0])


def segment_grams(ctx: MergeContext, index: int, along: str,
                  vectors: Callable[[Chunk], torch.Tensor]) -> torch.Tensor:
    """Per vector of tensor `index`, the float64 Gram `[V, m, m]` of the `m` rows `vectors(chunk)` gives."""
    shape = ctx.layout.shapes[index]
    count = vector_count(shape, along)
    offset = int(ctx.layout.offsets[index])

    def partial(chunk: Chunk) -> torch.Tensor:
        x = vectors(chunk).to(torch.float64)
        ids = vector_ids(shape, along, chunk.start - offset, len(chunk), x.device)
        if ids is None:
            return (x @ x.T).unsqueeze(0).cpu()
        m = x.shape[0]
        gram = torch.zeros(count, m, m, dtype=torch.float64, device=x.device)
        for i in range(m):
            for j in range(i, m):
                gram[:, i, j].index_add_(0, ids, x[i] * x[j])
                gram[:, j, i] = gram[:, i, j]
        return gram.cpu()

    return sum(ctx.map(partial, index))


@dataclass(frozen=True)
class CoefficientPlan:
    """Per-vector coefficients `[V, m]` of one tensor, looked up per entry of its chunks."""

    shape: torch.Size
    along: str
    offset: int  # flat index of the tensor's first entry
    coefficients: torch.Tensor  # float32 [V, m]

    def for_chunk(self, chunk: Chunk) -> torch.Tensor:
        """`[m, c]` coefficients of the chunk's entries (`[m, 1]` when the tensor is one vector)."""
        table = self.coefficients.to(chunk.base.device)
        ids = vector_ids(self.shape, self.along, chunk.start - self.offset, len(chunk), chunk.base.device)
        return table.T if ids is None else table[ids].T
