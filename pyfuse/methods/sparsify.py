"""The sparsification and sign-consensus core that TIES, DARE, AdaMerging++, breadcrumbs, DELLA and MagMax share
(docs/static-methods.md).

Every piece works on fp32 rows `[n, c]`, one row per task vector, in any split of the flat model, so the
same code serves the streaming engine (a chunk at a time, `Chunk.deltas`) and a buffer held in memory
(`ties_trim`, AdaMerging++'s trimmed task vectors). The pieces, in the order a TIES-like merge uses them:

1. magnitude select: `threshold_rank` (which smallest |tau| is the cut, for a density) and
   `magnitude_cuts` (the exact cut per row over the whole model or one tensor: `pyfuse.methods.select`);
   an entry is kept where `|x| > cut`, i.e. `|x| >= t`, ties at the threshold included; `magnitude_band`
   cuts both ends (breadcrumbs); `norm_ratio` restores a row's L1 norm after a cut (mergekit's `rescale`);
2. random drop and rescale: `task_uniforms` (the Philox draws of each row, from the global flat index, so
   any chunking draws the same), `drop_rescale` (DARE) and DELLA's rank-dependent drop use them;
3. sign election: `signed_sides` accumulates, per entry, the kept positive and negative weighted
   entries separately; `elect` picks one side per entry (`zero_sign` settles entries whose sum is 0);
   `sign_balance` is the per-chunk sum of elected signs from which TIES' whole-model `zero_sign` comes;
4. disjoint merge: `disjoint_merge` combines the picked side (sum, mean over its weights, or max);
   `consensus_merge` is mergekit's election and merge in one step; `max_magnitude` (MagMax) picks, per
   entry, the task vector of largest magnitude instead of electing a sign.

A new method that sparsifies differently (another cut, a random drop with other probabilities) replaces
step 1 or 2 and reuses 3 and 4.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from ..ops import sample_uniform
from .select import Reduce, kth_smallest_magnitude_bits

_NEG_TINY = -2147483647  # int32 bits of the negative float closest to zero: the cut below a threshold of 0
KEEP_ALL: float = torch.tensor(_NEG_TINY, dtype=torch.int32).view(torch.float32).item()
"""The cut that keeps every entry: `|x| > KEEP_ALL` always."""
_TRIM_CHUNK = 1 << 20  # columns of an in-memory buffer handled at a time by `ties_trim`

MapRows = Callable[[Callable[[torch.Tensor], Any]], Iterable[Any]]
"""`map_rows(fn)`: `fn` applied to every chunk `[n, c]` (fp32) of the rows, results in order."""


# ---------------------------------------------------------------------------------------------
# 1. magnitude select
# ---------------------------------------------------------------------------------------------
def threshold_rank(count: int, density: float, trim: str) -> int:
    """Which smallest |tau| (1-based) is the threshold, among `count` entries; 0 keeps everything.

    global (the TIES reference): `count - floor(count * density)`, so `floor(count * density) + 1` distinct
    values are kept (the reference's off-by-one); tensor (mergekit): the `max(1, floor(count * density))`-th
    largest, so exactly that many distinct values are kept.
    """
    kept = int(count * density)  # floor of the float product, as both references compute it
    if trim == "global":
        return count - kept
    return count - max(1, kept) + 1


def magnitude_cuts(map_rows: MapRows, n: int, rank: int, count: int, reduce: Reduce | None = None) -> list[float]:
    """Per row, the largest float below its rank-th smallest |x| over `count` entries: `|x| > cut` exactly
    when `|x| >= threshold`. A rank of 0 keeps everything (cut below 0). `reduce`: see `select`."""
    if rank == 0:
        bits = torch.zeros(n, dtype=torch.int32)
    else:
        bits = kth_smallest_magnitude_bits(map_rows, [rank] * n, count, reduce).cpu()
    return _below(bits).view(torch.float32).tolist()


def _below(bits: torch.Tensor) -> torch.Tensor:
    """The bits of the largest float below each magnitude (the negative tiny float below 0)."""
    return torch.where(bits > 0, bits - 1, torch.full_like(bits, _NEG_TINY))


def magnitude_band(map_rows: MapRows, n: int, low_rank: int, high_rank: int,
                   count: int) -> tuple[list[float], list[float]]:
    """Per row, cuts `(low, high)` with `low < |x| <= high` exactly when |x| lies between its low_rank-th and
    high_rank-th smallest |x| (1-based, both included, with every entry tied at either end). An empty band
    (`high_rank < low_rank`) keeps nothing; two passes for both ends at once."""
    if high_rank < max(low_rank, 1):
        return [math.inf] * n, [math.inf] * n
    low_rank = max(low_rank, 1)

    def both(fn: Callable[[torch.Tensor], Any]) -> Iterable[Any]:
        return map_rows(lambda rows: fn(torch.cat([rows, rows])))

    bits = kth_smallest_magnitude_bits(both, [low_rank] * n + [high_rank] * n, count).cpu()
    return _below(bits[:n]).view(torch.float32).tolist(), bits[n:].view(torch.float32).tolist()


def keep_band(rows: torch.Tensor, lows: Sequence[float], highs: Sequence[float]) -> torch.Tensor:
    """`rows` with the entries outside each row's band `low < |x| <= high` zeroed (a new tensor)."""
    magnitude = rows.abs()
    low = torch.tensor(lows, device=rows.device).unsqueeze(1)
    high = torch.tensor(highs, device=rows.device).unsqueeze(1)
    return rows.masked_fill((magnitude <= low) | (magnitude > high), 0.0)


def norm_ratio(before: float, after: float, eps: float = 1e-7) -> float:
    """The factor that gives a cut row its L1 norm back (`before / after`); 1 where either norm is below
    `eps` (mergekit's `rescale`: a row cut to nothing, or nothing to restore, is left as it is)."""
    return 1.0 if before < eps or after < eps else before / after


# ---------------------------------------------------------------------------------------------
# 2. random drop and rescale
# ---------------------------------------------------------------------------------------------
def task_uniforms(rows: torch.Tensor, seed: int, start: int) -> torch.Tensor:
    """The draws `[n, c]` for entry j of row i (global flat index `start + j`): the Philox uniform for key
    `seed`, counter `(start + j, step=i)`, the same whatever the chunking."""
    return torch.stack([sample_uniform(rows.shape[1], seed=seed, step=task, start=start, device=rows.device)
                        for task in range(rows.shape[0])])


def drop_rescale(rows: torch.Tensor, p: float, seed: int, start: int) -> torch.Tensor:
    """DARE: an entry dropped where its draw (`task_uniforms`) is below `p`; the survivors divided by
    `1 - p`. A new tensor."""
    return (rows / (1 - p)).masked_fill_(task_uniforms(rows, seed, start) < p, 0.0)


# ---------------------------------------------------------------------------------------------
# 3. sign election
# ---------------------------------------------------------------------------------------------
def signed_sides(rows: torch.Tensor, cuts: Sequence[float], weights: Sequence[float], *, counts: bool = False,
                 peaks: bool = False) -> tuple[torch.Tensor, torch.Tensor, Any, Any]:
    """The kept weighted entries of each sign: `pos` (sum of the positive ones) and `neg` (sum of the
    magnitudes of the negative ones), and with `counts` the summed weights of each side (for a mean), or
    with `peaks` the largest magnitude of each side instead of the sums (for max). A negative weight flips
    the side an entry votes for; rows of weight 0 are skipped."""
    pos = neg = pos_w = neg_w = None
    for row, cut, weight in zip(rows, cuts, weights):
        if weight == 0:
            continue
        up = torch.threshold(row, cut, 0.0)  # kept positive entries (x >= t  <=>  x > cut)
        down = torch.threshold(row.neg(), cut, 0.0)  # magnitudes of the kept negative entries
        if weight < 0:
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
        zeros = torch.zeros(rows.shape[1:], dtype=rows.dtype, device=rows.device)
        return zeros, zeros.clone(), zeros.clone(), zeros.clone()
    return pos, neg, pos_w, neg_w


def sign_balance(pos: torch.Tensor, neg: torch.Tensor) -> int:
    """The sum of the elected signs `sign(pos - neg)` (exact: a chunk has far fewer than 2^24 entries);
    consumes `pos`. Summed over the model, its sign is `zero_sign`."""
    return int(pos.sub_(neg).sign_().sum())


def elect(total: torch.Tensor, zero_sign: float) -> torch.Tensor:
    """1.0 where the positive side is elected (`total = pos - neg > 0`, or `= 0` with `zero_sign > 0`), else
    0.0: the TIES reference's rule, under which a 0 sum with no majority takes the negative side."""
    if zero_sign > 0:
        return torch.ones_like(total).sub_(total.neg().clamp_(min=0).sign_())
    return total.clamp(min=0).sign_()


# ---------------------------------------------------------------------------------------------
# 4. disjoint merge
# ---------------------------------------------------------------------------------------------
def disjoint_merge(pos: torch.Tensor, neg: torch.Tensor, pick: torch.Tensor, *, divisor_sides: tuple | None = None,
                   unit_weights: bool = True) -> torch.Tensor:
    """The elected side's value per entry (`pos` where `pick`, else `-neg`; consumes both). With
    `divisor_sides = (pos_w, neg_w)`, divided by the elected side's summed weights (1 where that is 0)."""
    other = 1 - pick
    merged = pos.mul_(pick).sub_(neg.mul_(other))  # exact: one of the two products is 0
    if divisor_sides is not None:
        pos_w, neg_w = divisor_sides
        divisor = pos_w.mul_(pick).add_(neg_w.mul_(other))
        if unit_weights:  # the divisor counts the kept entries: 0 -> 1 is a clamp (and cheap)
            divisor.clamp_(min=1.0)
        else:
            divisor.add_(divisor == 0)
        merged.div_(divisor)
    return merged


def consensus_merge(rows: torch.Tensor, weights: Sequence[float], *, normalize: bool,
                    unit_weights: bool) -> torch.Tensor:
    """mergekit's sign consensus over already sparsified rows: the elected sign of each entry is that of the
    weighted sum (0 counts as positive), the agreeing weighted entries are summed and, with `normalize`,
    divided by their summed weights (1 where none agree)."""
    pos, neg, pos_w, neg_w = signed_sides(rows, [KEEP_ALL] * rows.shape[0], weights, counts=normalize)
    pick = elect(pos - neg, 1.0)
    return disjoint_merge(pos, neg, pick, divisor_sides=(pos_w, neg_w) if normalize else None,
                          unit_weights=unit_weights)


def max_magnitude(rows: torch.Tensor) -> torch.Tensor:
    """MagMax's selection: per entry, the value of the row of largest magnitude, a later row winning a tie
    (so of `+a` and `-a`, the later one). A new tensor."""
    best = rows[0].clone()
    for row in rows[1:]:
        torch.where(row.abs() >= best.abs(), row, best, out=best)
    return best


# ---------------------------------------------------------------------------------------------
# In memory: AdaMerging++'s trimmed task vectors
# ---------------------------------------------------------------------------------------------
def ties_trim(vectors: torch.Tensor, density: float = 0.2) -> torch.Tensor:
    """TIES' trimmed, sign-agreeing task vectors `[n, D]` (same dtype as `vectors`, which is not changed):
    the entries the whole-model TIES merge (unit weights) sums, per task, as AdaMerging++ needs them."""
    if vectors.dim() != 2:
        raise ValueError(f"vectors must be [n, D], got shape {list(vectors.shape)}")
    if not (isinstance(density, (int, float)) and 0 < density <= 1):
        raise ValueError(f"density must be in (0, 1], got {density!r}")
    n, numel = vectors.shape
    spans = [(lo, min(lo + _TRIM_CHUNK, numel)) for lo in range(0, numel, _TRIM_CHUNK)]

    def map_rows(fn: Callable[[torch.Tensor], Any]) -> list[Any]:
        return [fn(vectors[:, lo:hi].float()) for lo, hi in spans]

    cuts = magnitude_cuts(map_rows, n, threshold_rank(numel, density, "global"), numel)
    ones = [1.0] * n
    total = sum(map_rows(lambda rows: sign_balance(*signed_sides(rows, cuts, ones)[:2])))
    zero_sign = float((total > 0) - (total < 0))
    out = vectors.clone()
    for lo, hi in spans:
        rows = vectors[:, lo:hi].float()
        pos, neg, _, _ = signed_sides(rows, cuts, ones)
        pick = elect(pos.sub_(neg), zero_sign).bool()
        cut = torch.tensor(cuts, device=rows.device).unsqueeze(1)
        kept = torch.where(pick, rows > cut, rows < -cut)
        out[:, lo:hi].masked_fill_(~kept, 0)
    return out
