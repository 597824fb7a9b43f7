"""Model Breadcrumbs (Davari & Belilovsky, 2023) as mergekit merges it: `breadcrumbs`, and with
`consensus: true` its `breadcrumbs_ties`.

Per tensor of `m` entries and per task vector, mergekit keeps the entries ranked `n_bot + 1 ... m - n_top`
by magnitude (ascending), with `n_top = floor(gamma * m)` of the largest and
`n_bot = m - floor(density * m) - n_top` of the smallest removed (if `n_bot` would be negative, fewer of
the largest are removed instead). `density >= 1` leaves the task vector whole, whatever `gamma`.

Two departures, both where mergekit's result is arbitrary or accidental: entries tied in magnitude at either
end of the kept band are all kept (mergekit's unstable sort keeps an arbitrary subset), and when
`n_top = 0` nothing is removed from the top (mergekit's slice `[n_bot:-0]` is empty, so it drops the whole
task vector of any tensor with fewer than `1 / gamma` entries, or every tensor at `gamma = 0`).

The band's two cuts come from the exact streaming select (`sparsify.magnitude_band`); the combination is
`gta.GeneralizedTaskArithmetic`.
"""

from __future__ import annotations

import torch

from .base import Chunk, MergeContext, Param, boolean, number, register
from .gta import LAMBDA, MERGEKIT_WEIGHTS, GeneralizedTaskArithmetic
from .select import histogram_bytes
from .sparsify import keep_band, magnitude_band


def band_ranks(count: int, density: float, gamma: float) -> tuple[int, int]:
    """The 1-based ascending magnitude ranks `(first, last)` mergekit's breadcrumbs keeps among `count`."""
    kept = int(density * count)
    top = int(gamma * count)
    bottom = count - kept - top
    if bottom < 0:
        top += bottom
        bottom = 0
    return bottom + 1, count - top


@register
class Breadcrumbs(GeneralizedTaskArithmetic):
    """mergekit's Model Breadcrumbs: drop the largest and smallest magnitudes of each task vector, then sum."""

    name = "breadcrumbs"
    display_name = "Breadcrumbs"
    reference = "Davari & Belilovsky, 2023, Model Breadcrumbs"
    summary = "drop each task vector's `gamma` largest and smallest magnitudes down to `density` per tensor, then sum"
    params = {
        "density": Param(1.0, number(0, 1), "fraction of each tensor's task vector kept, in [0, 1]"),
        "gamma": Param(0.01, number(0, 1), "fraction of each tensor's largest magnitudes removed, in [0, 1] "
                                           "(the paper's beta)"),
        "lambda": LAMBDA,
        "consensus": Param(False, boolean, "TIES sign consensus before summing (true: mergekit's breadcrumbs_ties)"),
        "normalize": Param(False, boolean, "divide by the summed weights (of the agreeing entries, with consensus)"),
        "rescale": Param(False, boolean, "give each sparsified task vector its L1 norm back, per tensor"),
        "weights": MERGEKIT_WEIGHTS,
    }

    select_passes = 2

    def state_bytes(self, layout, n, in_flight) -> int:
        return histogram_bytes(2 * n, in_flight)  # the select's tables, for both ends of the band at once

    def sparse_plan(self, ctx: MergeContext, index: int) -> tuple[list[float], list[float]] | None:
        if self.parameters["density"] >= 1:
            return None
        count = ctx.layout.shapes[index].numel()
        first, last = band_ranks(count, self.parameters["density"], self.parameters["gamma"])
        return magnitude_band(lambda fn: ctx.map(lambda chunk: fn(chunk.deltas), index), ctx.n, first, last, count)

    def sparsify(self, chunk: Chunk, plan: tuple[list[float], list[float]]) -> torch.Tensor:
        return keep_band(chunk.deltas, *plan)
