"""DARE: drop each task-vector entry with probability p, rescale the survivors by 1/(1-p), then merge them.

The drop (`pyfuse.methods.sparsify.drop_rescale`, the shared core) is drawn from the project's
counter-based Philox stream (`pyfuse.ops.philox`): entry j of task i
is kept when `u >= p`, with `u` the uniform for key `seed`, counter `(j, step=i)`. Being a function of the
global flat index, the same entries are dropped whatever the chunking, in memory or streamed, and the
pre-passes of the method that follows (TIES' thresholds) see exactly the vectors it then merges.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import torch

from .base import Chunk, MergeContext, Param, StaticMethod, choice, create_method, integer, number, register
from .sparsify import drop_rescale

_THEN = ("task_arithmetic", "ties")


class _Dropped:
    """A view of a context whose chunks carry the dropped and rescaled task vectors."""

    def __init__(self, ctx: MergeContext, dare: Dare):
        self._ctx, self._dare = ctx, dare
        self.layout, self.n, self.device = ctx.layout, ctx.n, ctx.device
        self.sum_over_ranks = ctx.sum_over_ranks

    def map(self, fn: Callable[[Chunk], Any], index: int | None = None, desc: str | None = None) -> Iterator[Any]:
        return self._ctx.map(lambda chunk: fn(self._dare.drop(chunk)), index, desc)


@register
class Dare(StaticMethod):
    """DARE (Yu et al., 2024) followed by Task Arithmetic or TIES; other parameters go to that method."""

    name = "dare"
    stochastic = True
    display_name = "DARE"
    reference = "Yu et al., 2024, Language Models are Super Mario"
    summary = "drop task-vector entries at random (rate p), rescale, then merge by `then` (its parameters too)"
    params = {
        "p": Param(0.5, number(0, 1, high_open=True), "drop probability, in [0, 1)"),
        "seed": Param(0, integer(0, 2**64), "Philox key of the drop"),
        "then": Param("task_arithmetic", choice(*_THEN), "the merge applied after the drop"),
    }

    def __init__(self, **params: Any) -> None:
        own = {key: value for key, value in params.items() if key in self.params}
        super().__init__(**own)
        rest = {key: value for key, value in params.items() if key not in self.params}
        try:
            self.inner: StaticMethod = create_method(self.parameters["then"], **rest)
        except ValueError as err:
            raise ValueError(f"dare (then={self.parameters['then']}): {err}") from None
        self.temporaries = tuple(a + b for a, b in zip(self.inner.temporaries, (1, 2)))
        self.split_global_passes = self.inner.split_global_passes
        self.parameters.update(self.inner.parameters)

    def drop(self, chunk: Chunk) -> Chunk:
        p = self.parameters["p"]
        if p == 0:
            return chunk
        return dataclasses.replace(chunk, deltas=drop_rescale(chunk.deltas, p, self.parameters["seed"], chunk.start))

    def bind(self, layout, n) -> None:
        self.inner.bind(layout, n)

    def prepare(self, ctx: MergeContext) -> None:
        self.inner.prepare(_Dropped(ctx, self))

    def plan(self, ctx: MergeContext, index: int) -> Any:
        return self.inner.plan(_Dropped(ctx, self), index)

    def merge_chunk(self, chunk: Chunk, plan: Any) -> torch.Tensor:
        return self.inner.merge_chunk(self.drop(chunk), plan)

    def state_bytes(self, layout, n, in_flight) -> int:
        return self.inner.state_bytes(layout, n, in_flight)

    def global_passes(self) -> int:
        return self.inner.global_passes()
