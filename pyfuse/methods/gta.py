"""mergekit's generalized task arithmetic, the frame its breadcrumbs and DELLA merges share.

Per tensor: each task vector is sparsified (`sparsify`, the method's own cut or drop), optionally given its
L1 norm back (`rescale`, `sparsify.norm_ratio`), weighted, and combined:

- with `consensus` (breadcrumbs_ties, della): TIES' sign election, a zero sum counting as positive, and
  the sum of the agreeing weighted entries, divided by their summed weights with `normalize`;
- without (breadcrumbs, della_linear): the weighted sum, divided by the summed weights with `normalize`
  (1 where that is below 1e-8 in magnitude).

The result is `b + lambda * combined`. Sparsifying, election and merge are the shared core
`pyfuse.methods.sparsify`; the norms take one pass over the tensor in `plan`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch

from .base import WEIGHTS, Chunk, MergeContext, Param, StaticMethod, number
from .linear import load_op, weighted_sum
from .sparsify import consensus_merge, norm_ratio

LAMBDA = Param(1.0, number(), "the factor on the combined task vectors (mergekit's `lambda`)")
MERGEKIT_WEIGHTS = dataclasses.replace(
    WEIGHTS, help="per-model weights, one per fine-tuned model (mergekit's per-model `weight`; default: all 1)")


class GeneralizedTaskArithmetic(StaticMethod):
    """Sparsify each task vector, then combine by sign consensus or a weighted sum (module docstring)."""

    temporaries = (4, 6)
    #: at most how many passes over a tensor `sparse_plan` takes (breadcrumbs' band: a two-pass select)
    select_passes: ClassVar[int] = 0

    def bind(self, layout, n) -> None:
        super().bind(layout, n)
        self._unit_weights = bool((self.weights == 1).all())
        total = float(self.weights.sum())
        self._linear_divisor = total if self.parameters["normalize"] and abs(total) >= 1e-8 else 1.0
        if not self.parameters["consensus"]:
            load_op()

    def sparsify(self, chunk: Chunk, plan: Any) -> torch.Tensor:
        """The chunk's sparsified task vectors `[n, c]`, before any rescale."""
        raise NotImplementedError

    def sparse_plan(self, ctx: MergeContext, index: int) -> Any:
        """What `sparsify` needs about tensor `index`; None leaves the tensor's task vectors as they are."""
        return None

    def tensor_passes(self) -> int:
        """The select's passes, and one for the norms when rescaling; none when nothing is sparsified."""
        if self.parameters["density"] >= 1:
            return 0
        return self.select_passes + int(self.parameters["rescale"])

    def plan(self, ctx: MergeContext, index: int) -> tuple[Any, list[float] | None]:
        sparse = self.sparse_plan(ctx, index)
        if sparse is None or not self.parameters["rescale"]:
            return sparse, None

        def norms(chunk: Chunk) -> torch.Tensor:
            kept = self.sparsify(chunk, sparse)
            return torch.stack([chunk.deltas.abs().sum(1, dtype=torch.float64), kept.abs().sum(1, dtype=torch.float64)])

        before, after = sum(ctx.map(norms, index)).tolist()
        return sparse, [norm_ratio(b, a) for b, a in zip(before, after)]

    def merge_chunk(self, chunk: Chunk, plan: tuple[Any, list[float] | None]) -> torch.Tensor:
        sparse, ratios = plan
        rows = chunk.deltas if sparse is None else self.sparsify(chunk, sparse)
        if ratios is not None:
            rows = rows * torch.tensor(ratios, device=rows.device).unsqueeze(1)
        if not self.parameters["consensus"]:
            coefficients = self.weights * (self.parameters["lambda"] / self._linear_divisor)
            return weighted_sum(chunk.base, rows, coefficients)
        merged = consensus_merge(rows, self.weights.tolist(), normalize=self.parameters["normalize"],
                                 unit_weights=self._unit_weights)
        return torch.add(chunk.base, merged, alpha=self.parameters["lambda"])

