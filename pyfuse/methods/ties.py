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

Thresholds come from `pyfuse.io.select`: exact, two passes, memory independent of the model size.

The kept entries of each sign are accumulated separately (`pos`, the agreeing positive weighted entries,
and `neg`, the magnitudes of the negative ones), so the elected sum is `pos - neg` and the merge picks
one side per entry; with two models this is the reference's arithmetic exactly, with more the elected
sum may round differently in its last bit.
"""

from __future__ import annotations

import torch

from ..io.select import histogram_bytes, kth_smallest_magnitude_bits
from . import WEIGHTS, Chunk, MergeContext, Param, StaticMethod, choice, number, register

_NEG_TINY = -2147483647  # int32 bits of the negative float closest to zero: the cut below a threshold of 0


def threshold_rank(count: int, density: float, trim: str) -> int:
    """Which smallest |tau| (1-based) is the threshold, among `count` entries; 0 keeps everything.

    global (the reference): `count - floor(count * density)`, so `floor(count * density) + 1` distinct
    values are kept (the reference's off-by-one); tensor (mergekit): the `max(1, floor(count * density))`-th
    largest, so exactly that many distinct values are kept.
    """
    kept = int(count * density)  # floor of the float product, as both references compute it
    if trim == "global":
        return count - kept
    return count - max(1, kept) + 1


def threshold_bits(ctx: MergeContext, index: int | None, rank: int, desc: str | None = None) -> torch.Tensor:
    """Per task, the bits (int32 `[n]`) of the rank-th smallest |tau| over tensor `index`, or the whole model.

    Zero (keep everything) for rank 0.
    """
    if rank == 0:
        return torch.zeros(ctx.n, dtype=torch.int32)
    count = ctx.layout.numel if index is None else ctx.layout.shapes[index].numel()
    return kth_smallest_magnitude_bits(
        lambda fn: ctx.map(lambda chunk: fn(chunk.deltas), index, desc=desc), [rank] * ctx.n, count
    ).cpu()


def _cuts(bits: torch.Tensor) -> list[float]:
    """Per task, the largest float below the threshold: `x > cut` exactly when `x >= threshold`."""
    below = torch.where(bits > 0, bits - 1, torch.full_like(bits, _NEG_TINY))
    return below.view(torch.float32).tolist()


@register
class Ties(StaticMethod):
    """TIES-Merging (Yadav et al., 2023), with the paper's whole-model trim or mergekit's per-tensor one."""

    name = "ties"
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

    def __init__(self, **params) -> None:
        super().__init__(**params)
        if self.config["merge_func"] is None:
            self.config["merge_func"] = "mean" if self.config["trim"] == "tensor" else "sum"
        self._global: tuple[list[float], float] | None = None

    def bind(self, layout, n) -> None:
        super().bind(layout, n)
        self._unit_weights = bool((self.weights == 1).all())

    def global_passes(self) -> int:
        return 3 if self.config["trim"] == "global" else 0

    def state_bytes(self, layout, n, in_flight) -> int:
        return histogram_bytes(n, in_flight)

    def prepare(self, ctx: MergeContext) -> None:
        if self.config["trim"] != "global":
            return
        rank = threshold_rank(ctx.layout.numel, self.config["density"], "global")
        cuts = _cuts(threshold_bits(ctx, None, rank, desc="ties: thresholds"))

        def balance(chunk: Chunk) -> int:
            pos, neg, _, _ = self._sides(chunk, cuts)
            return int(pos.sub_(neg).sign_().sum())  # exact: a chunk has far fewer than 2^24 entries

        # the sign of the sum of the elected signs over the whole model settles entries whose sum is 0
        total = sum(ctx.map(balance, desc="ties: sign election"))
        self._global = (cuts, float((total > 0) - (total < 0)))

    def plan(self, ctx: MergeContext, index: int) -> tuple[list[float], float]:
        if self.config["trim"] == "global":
            if self._global is None:
                raise RuntimeError("ties: prepare() must run before plan() with trim='global'")
            return self._global
        rank = threshold_rank(ctx.layout.shapes[index].numel(), self.config["density"], "tensor")
        return _cuts(threshold_bits(ctx, index, rank)), 1.0

    def _sides(self, chunk: Chunk, cuts: list[float], counts: bool = False, peaks: bool = False):
        """The kept weighted entries of each sign: sums `pos`, `neg` (magnitudes) and optionally their
        summed weights (for mean) or largest magnitudes (for max)."""
        pos = neg = pos_w = neg_w = None
        for row, cut, weight in zip(chunk.deltas, cuts, self.weights.tolist()):
            if weight == 0:
                continue
            up = torch.threshold(row, cut, 0.0)  # kept positive entries (x >= t  <=>  x > cut)
            down = torch.threshold(row.neg(), cut, 0.0)  # magnitudes of the kept negative entries
            if weight < 0:  # a negative weight flips the sign an entry votes for
                up, down = down, up
            if abs(weight) != 1:
                up.mul_(abs(weight))
                down.mul_(abs(weight))
            if pos is None:
                pos, neg = up, down
                if counts:
                    pos_w, neg_w = up.sign(), down.sign()
                    if weight != 1:
                        pos_w.mul_(weight)
                        neg_w.mul_(weight)
            else:
                if peaks:
                    torch.maximum(pos, up, out=pos)
                    torch.maximum(neg, down, out=neg)
                else:
                    pos.add_(up)
                    neg.add_(down)
                if counts:
                    pos_w.add_(up.sign_(), alpha=weight)
                    neg_w.add_(down.sign_(), alpha=weight)
        if pos is None:
            zeros = torch.zeros_like(chunk.base)
            return zeros, zeros.clone(), zeros.clone(), zeros.clone()
        return pos, neg, pos_w, neg_w

    def merge_chunk(self, chunk: Chunk, plan: tuple[list[float], float]) -> torch.Tensor:
        cuts, zero_sign = plan
        merge_func = self.config["merge_func"]
        pos, neg, pos_w, neg_w = self._sides(chunk, cuts, counts=merge_func == "mean")
        if merge_func == "max":
            # the elected sign needs the sums; the merge needs the largest magnitudes
            total = pos.sub_(neg)
            pos, neg, _, _ = self._sides(chunk, cuts, peaks=True)
        else:
            total = pos - neg
        # pick[j] = 1 where the positive side is elected: s > 0, or s = 0 with a positive majority
        if zero_sign > 0:
            pick = torch.ones_like(total).sub_(total.neg().clamp_(min=0).sign_())
        else:
            pick = total.clamp(min=0).sign_()
        other = 1 - pick
        merged = pos.mul_(pick).sub_(neg.mul_(other))  # exact: one of the two products is 0
        if merge_func == "mean":
            divisor = pos_w.mul_(pick).add_(neg_w.mul_(other))
            if self._unit_weights:  # the divisor counts the kept entries: 0 -> 1 is a clamp (and cheap)
                divisor.clamp_(min=1.0)
            else:
                divisor.add_(divisor == 0)
            merged.div_(divisor)
        elif merge_func == "max" and zero_sign == 0:
            merged.mul_(total.sign_().abs_())  # s stays 0 when the whole model is balanced: max * s = 0
        return torch.add(chunk.base, merged, alpha=self.config["scaling"])
