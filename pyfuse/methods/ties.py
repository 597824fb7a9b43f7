"""TIES merging: trim each task vector to its largest magnitudes, elect a sign per entry, merge the agreeing ones.

trim="global" (the default) is the paper's reference: per task, over the whole flattened model,
`k = D - floor(D * density)` and `t_i` = the k-th smallest `|tau_i|`; entries with `|tau_ij| >= t_i` are
kept, ties included (so `floor(D * density) + 1` distinct values survive: the reference's off-by-one).
The elected sign is `s = sign(sum_i w_i trimmed_ij)`; zeros take the sign of the sum of all elected signs
over the model; an entry is kept where `s > 0` and `w_i trimmed_ij > 0`, or `s <= 0` and
`w_i trimmed_ij < 0` (the reference's rule, which also settles a zero majority). Merge functions:
`sum` of the kept entries; `mean`, divided by the summed weights of the kept entries (their count with
unit weights; 1 where that is 0); `max`, the largest kept magnitude times `s`. Result: `b + scaling * merged`.

trim="tensor" is mergekit's variant: per tensor, the `max(1, floor(density * numel))` largest magnitudes
are kept (ties at the threshold all kept, where mergekit breaks them arbitrarily), zeros of the elected
sum are taken as positive, and by default merge_func="mean", mergekit's normalisation by the summed
agreeing weights.

The trim, election and merge are the shared core `pyfuse.methods.sparsify`; thresholds come from
`pyfuse.methods.select`: exact, two passes, memory independent of the model size.

The kept entries of each sign are accumulated separately (`pos`, the agreeing positive weighted entries,
and `neg`, the magnitudes of the negative ones), so the elected sum is `pos - neg` and the merge picks
one side per entry; with two models this is the reference's arithmetic exactly, with more the elected
sum may round differently in its last bit.
"""

from __future__ import annotations

import torch

from .base import WEIGHTS, Chunk, MergeContext, Param, StaticMethod, choice, number, register
from .select import histogram_bytes
from .sparsify import disjoint_merge, elect, magnitude_cuts, sign_balance, signed_sides, threshold_rank


def _cuts(ctx: MergeContext, index: int | None, rank: int, desc: str | None = None) -> list[float]:
    """Per task, the magnitude cut over tensor `index`, or the whole model (`magnitude_cuts`)."""
    count = ctx.layout.numel if index is None else ctx.layout.shapes[index].numel()
    return magnitude_cuts(lambda fn: ctx.map(lambda chunk: fn(chunk.deltas), index, desc=desc), ctx.n, rank, count,
                          ctx.sum_over_ranks if index is None else None)


@register
class Ties(StaticMethod):
    """TIES-Merging (Yadav et al., 2023), with the paper's whole-model trim or mergekit's per-tensor one."""

    name = "ties"
    display_name = "Ties-Merging"
    reference = "Yadav et al., 2023, TIES-Merging"
    summary = "trim to the top `density` magnitudes, elect signs, merge the agreeing entries"
    params = {
        "density": Param(0.2, number(0, 1, low_open=True), "fraction of each task vector kept, in (0, 1]"),
        "scaling": Param(0.3, number(), "lambda, the factor on the merged task vector"),
        "merge_func": Param(None, choice("sum", "mean", "max"),
                            "sum | mean | max (default: sum; mean with trim='tensor')"),
        "trim": Param("global", choice("global", "tensor"),
                      "global: the paper's whole-model trim; tensor: mergekit's per-tensor trim"),
        "weights": WEIGHTS,
    }
    temporaries = (2, 8)
    split_global_passes = True  # the thresholds' histograms and the sign balance are integer sums

    def __init__(self, **params) -> None:
        super().__init__(**params)
        if self.parameters["merge_func"] is None:
            self.parameters["merge_func"] = "mean" if self.parameters["trim"] == "tensor" else "sum"
        self._global: tuple[list[float], float] | None = None

    def bind(self, layout, n) -> None:
        super().bind(layout, n)
        self._unit_weights = bool((self.weights == 1).all())

    def global_passes(self) -> int:
        return 3 if self.parameters["trim"] == "global" else 0

    def state_bytes(self, layout, n, in_flight) -> int:
        return histogram_bytes(n, in_flight)

    def prepare(self, ctx: MergeContext) -> None:
        if self.parameters["trim"] != "global":
            return
        rank = threshold_rank(ctx.layout.numel, self.parameters["density"], "global")
        cuts = _cuts(ctx, None, rank, desc="ties: thresholds")

        def balance(chunk: Chunk) -> int:
            return sign_balance(*self._sides(chunk, cuts)[:2])

        # the sign of the sum of the elected signs over the whole model settles entries whose sum is 0
        total = int(ctx.sum_over_ranks(torch.tensor(sum(ctx.map(balance, desc="ties: sign election")))))
        self._global = (cuts, float((total > 0) - (total < 0)))

    def plan(self, ctx: MergeContext, index: int) -> tuple[list[float], float]:
        if self.parameters["trim"] == "global":
            if self._global is None:
                raise RuntimeError("ties: prepare() must run before plan() with trim='global'")
            return self._global
        rank = threshold_rank(ctx.layout.shapes[index].numel(), self.parameters["density"], "tensor")
        return _cuts(ctx, index, rank), 1.0

    def _sides(self, chunk: Chunk, cuts: list[float], counts: bool = False, peaks: bool = False):
        return signed_sides(chunk.deltas, cuts, self.weights.tolist(), counts=counts, peaks=peaks)

    def merge_chunk(self, chunk: Chunk, plan: tuple[list[float], float]) -> torch.Tensor:
        cuts, zero_sign = plan
        merge_func = self.parameters["merge_func"]
        pos, neg, pos_w, neg_w = self._sides(chunk, cuts, counts=merge_func == "mean")
        if merge_func == "max":
            # the elected sign needs the sums; the merge needs the largest magnitudes
            total = pos.sub_(neg)
            pos, neg, _, _ = self._sides(chunk, cuts, peaks=True)
        else:
            total = pos - neg
        pick = elect(total, zero_sign)
        merged = disjoint_merge(pos, neg, pick, divisor_sides=(pos_w, neg_w) if merge_func == "mean" else None,
                                unit_weights=self._unit_weights)
        if merge_func == "max" and zero_sign == 0:
            merged.mul_(total.sign_().abs_())  # s stays 0 when the whole model is balanced: max * s = 0
        return torch.add(chunk.base, merged, alpha=self.parameters["scaling"])
