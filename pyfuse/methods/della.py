"""DELLA (Deep et al., 2024) as mergekit merges it: `della`, and with `consensus: false` its `della_linear`.

Per tensor and task vector (MAGPRUNE): within each row (the entries along dimension 1 for every index of
the others; a 1-D tensor is one row), the entry of ascending magnitude rank `r` (0-based, of `L`) is kept
with probability `(density - epsilon) + r / (L - 1) * 2 * epsilon`, computed in fp32 as mergekit does;
the kept task vector gets its L1 norm back (`rescale`, on by default), then `gta.GeneralizedTaskArithmetic`
combines. `density >= 1` leaves task vectors whole; `density = 0` drops them.

The draws are the project's Philox stream (`sparsify.task_uniforms`, key `seed`, counter: flat position,
task index), an entry kept where its uniform is below its probability, so the result depends on neither
chunking nor threads; chunks hold whole rows (`chunk_unit`). Departures from mergekit, where its result
is arbitrary or undefined: entries tied in magnitude are ranked by position (its sort is unstable), and
an entry alone in its row is kept with probability `density` (mergekit's rank normalisation divides 0 by 0).
"""

from __future__ import annotations

import torch

from .base import Chunk, MergeContext, Param, boolean, integer, number, register
from .gta import LAMBDA, MERGEKIT_WEIGHTS, GeneralizedTaskArithmetic
from .sparsify import task_uniforms


def row_shape(shape: torch.Size) -> tuple[int, int]:
    """(row length `L`, trailing block `R`): a block of `L * R` entries holds `R` interleaved rows of `L`."""
    if len(shape) < 2:
        return max(shape.numel(), 1), 1
    return shape[1], shape[2:].numel()


def keep_probabilities(magnitudes: torch.Tensor, length: int, density: float, epsilon: float) -> torch.Tensor:
    """MAGPRUNE's keep probabilities for `magnitudes` `[..., L, R]` (rows along dimension -2)."""
    if length == 1:
        return torch.full_like(magnitudes, density)
    order = magnitudes.argsort(dim=-2, stable=True)
    positions = torch.arange(length, dtype=torch.float32, device=magnitudes.device).view(length, 1)
    ranks = torch.empty_like(magnitudes).scatter_(-2, order, positions.expand(magnitudes.shape))  # order's inverse
    rank_norm = (ranks / (length - 1)).clamp_(0, 1)
    return (density - epsilon) + rank_norm * 2 * epsilon


@register
class Della(GeneralizedTaskArithmetic):
    """mergekit's DELLA: drop task-vector entries at random, the smaller more often, restore the norm, merge."""

    name = "della"
    stochastic = True
    display_name = "DELLA"
    reference = "Deep et al., 2024, DELLA-Merging"
    summary = "drop entries with a probability falling with their magnitude rank in each row, rescale, then TIES"
    params = {
        "density": Param(1.0, number(0, 1), "mean fraction of each task vector kept, in [0, 1]"),
        "epsilon": Param(0.15, number(), "half-width of the keep probabilities around density; "
                                         "density - epsilon and density + epsilon must lie in (0, 1)"),
        "lambda": LAMBDA,
        "consensus": Param(True, boolean, "TIES sign consensus before summing (false: mergekit's della_linear)"),
        "normalize": Param(None, boolean, "divide by the summed weights (of the agreeing entries, with "
                                          "consensus); default: true with consensus, false without"),
        "rescale": Param(True, boolean, "give each sparsified task vector its L1 norm back, per tensor"),
        "seed": Param(0, integer(0, 2**64), "Philox key of the draws"),
        "weights": MERGEKIT_WEIGHTS,
    }

    def __init__(self, **params) -> None:
        super().__init__(**params)
        if self.parameters["normalize"] is None:
            self.parameters["normalize"] = self.parameters["consensus"]
        density, epsilon = self.parameters["density"], self.parameters["epsilon"]
        if 0 < density < 1 and not (density - epsilon > 0 and density + epsilon < 1):
            raise ValueError(f"della: epsilon {epsilon!r} puts density -/+ epsilon outside (0, 1) "
                             f"(density {density!r})")

    def chunk_unit(self, shape: torch.Size) -> int:
        length, trailing = row_shape(shape)
        return length * trailing

    def sparse_plan(self, ctx: MergeContext, index: int) -> tuple[int, int] | None:
        return None if self.parameters["density"] >= 1 else row_shape(ctx.layout.shapes[index])

    def sparsify(self, chunk: Chunk, plan: tuple[int, int]) -> torch.Tensor:
        density = self.parameters["density"]
        if density <= 0:
            return torch.zeros_like(chunk.deltas)
        length, trailing = plan
        blocks = chunk.deltas.view(chunk.deltas.shape[0], -1, length, trailing)
        probs = keep_probabilities(blocks.abs(), length, density, self.parameters["epsilon"])
        dropped = task_uniforms(chunk.deltas, self.parameters["seed"], chunk.start) >= probs.view_as(chunk.deltas)
        return chunk.deltas.masked_fill(dropped, 0.0)
