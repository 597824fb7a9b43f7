"""The exact k-th smallest magnitude of vectors too long to hold, by a radix select over the float bits.

For a non-negative float32, the order of its bit patterns read as integers is the order of the values,
so a select can histogram the bits instead of sorting. Pass 1 counts the top 16 bits of |x| (sign
dropped) and finds the bin that holds the k-th value; pass 2 counts the low 15 bits of the values in
that bin, which fixes the remaining bits. Two passes over the data, exact for any length and any ties,
in the memory of one chunk plus the histograms (`n * 2^16` counts), whatever the length of the vectors.

The data is reached through `map_chunks(fn)`, which applies `fn` to every chunk (fp32 `[n, c]`, row i a
piece of vector i, in any split) and returns the results, so the caller decides how chunks are read and
whether they are processed in parallel; the histograms of the chunks are summed here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

_LO_BITS = 15
_HI_BINS = 1 << (31 - _LO_BITS)
_LO_BINS = 1 << _LO_BITS

SMALL = 1 << 16  # rows this short are selected directly: cheaper than two passes of histograms
MapChunks = Callable[[Callable[[torch.Tensor], Any]], Iterable[Any]]
Reduce = Callable[[torch.Tensor], torch.Tensor]  # an int64 histogram -> its sum over processes


def magnitude_bits(x: torch.Tensor) -> torch.Tensor:
    """The bits of |x| (fp32) as int32, whose integer order is the order of the magnitudes."""
    if x.dtype != torch.float32:
        raise TypeError(f"magnitude_bits expects float32, got {x.dtype}")
    return x.contiguous().view(torch.int32) & 0x7FFFFFFF


def bits_to_float(bits: torch.Tensor) -> torch.Tensor:
    return bits.to(torch.int32).view(torch.float32)


def histogram_bytes(n: int, in_flight: int = 1) -> int:
    """Memory a select over n rows holds beyond chunks, at most: the pass-1 histogram, its cumulative sum,
    and `in_flight` per-chunk histograms waiting to be added."""
    return (2 + in_flight) * n * _HI_BINS * 8


def _row_counts(keys: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    """Per row of non-negative int32 keys, (its smallest key, the counts of each key from there on).

    Spanning only the keys present keeps small chunks cheap (no full-width histogram per chunk).
    """
    result = []
    for row in keys:
        low = int(row.min())
        result.append((low, torch.bincount(row - low)))
    return result


def _accumulate(parts: Iterable[list[tuple[int, torch.Tensor]]], n: int, width: int) -> torch.Tensor | None:
    hist = None
    for rows in parts:
        if hist is None:
            hist = torch.zeros(n, width, dtype=torch.int64, device=rows[0][1].device)
        for row, (low, counts) in zip(hist, rows):
            row[low: low + counts.numel()] += counts
    return hist


def _summed(hist: torch.Tensor | None, n: int, width: int, reduce: Reduce | None) -> torch.Tensor | None:
    """This process's histogram, or with `reduce` the sum over processes (a process may hold no data)."""
    if reduce is None:
        return hist
    return reduce(torch.zeros(n, width, dtype=torch.int64) if hist is None else hist)


def _check_ranks(ks: Sequence[int], totals: Sequence[int]) -> None:
    for i, (k, total) in enumerate(zip(ks, totals)):
        if not 1 <= k <= total:
            raise ValueError(f"row {i}: k = {k} is outside [1, {total}]")


def _locate(hist: torch.Tensor, ranks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the bin holding the rank-th element (1-based) and the rank within that bin."""
    cum = hist.cumsum(1)
    bins = torch.searchsorted(cum, ranks.unsqueeze(1)).squeeze(1)
    below = cum.gather(1, bins.unsqueeze(1)).squeeze(1) - hist.gather(1, bins.unsqueeze(1)).squeeze(1)
    return bins, ranks - below


def kth_smallest_magnitude_bits(map_chunks: MapChunks, ks: Sequence[int], count: int | None = None,
                                reduce: Reduce | None = None) -> torch.Tensor:
    """Per row i, the bits (int32 `[n]`, see `magnitude_bits`) of the ks[i]-th smallest |x_i|, 1-based.

    `map_chunks` is called twice and must present the same data both times. Given `count`, the length of
    the rows, rows of at most `SMALL` elements are gathered in one pass and selected directly instead.
    With `reduce`, `map_chunks` presents one process's part of the rows and `reduce` sums a histogram
    over the processes (`pyfuse.distributed`): the select is over the whole rows, each pass one reduction.
    """
    n = len(ks)
    if reduce is None and count is not None and count <= SMALL:
        rows = torch.cat(list(map_chunks(lambda chunk: magnitude_bits(chunk).cpu())), dim=1)
        _check_ranks(ks, [rows.shape[1]] * n)
        return torch.stack([row.kthvalue(k).values for row, k in zip(rows, ks)])

    def high_counts(chunk: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
        if chunk.dim() != 2 or chunk.shape[0] != n:
            raise ValueError(f"expected chunks of {n} rows (one per k), got shape {list(chunk.shape)}")
        return _row_counts(magnitude_bits(chunk).bitwise_right_shift_(_LO_BITS))

    hist = _summed(_accumulate(map_chunks(high_counts), n, _HI_BINS), n, _HI_BINS, reduce)
    if hist is None:
        raise ValueError("cannot select from empty data")
    ranks = torch.tensor(list(ks), dtype=torch.int64, device=hist.device)
    _check_ranks(ks, hist.sum(1).tolist())
    high, ranks = _locate(hist, ranks)
    del hist
    # pass 2: v = bits - (high << 15) is in [0, 2^15) exactly for the elements of the chosen bin; the
    # rest are clamped onto an overflow bin at each end, counted and dropped
    lowest = (high.to(torch.int32) << _LO_BITS).unsqueeze(1)

    def low_counts(chunk: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
        return _row_counts(magnitude_bits(chunk).sub_(lowest.to(chunk.device)).clamp_(-1, _LO_BINS).add_(1))

    low_hist = _summed(_accumulate(map_chunks(low_counts), n, _LO_BINS + 2), n, _LO_BINS + 2, reduce)
    low_hist = low_hist[:, 1:-1].contiguous()
    low, _ = _locate(low_hist, ranks.to(low_hist.device))
    return ((high.to(low.device) << _LO_BITS) | low).to(torch.int32)


def kth_smallest_magnitude(map_chunks: MapChunks, ks: Sequence[int], count: int | None = None,
                           reduce: Reduce | None = None) -> torch.Tensor:
    """Per row i, the ks[i]-th smallest |x_i| (1-based) as fp32 `[n]`; see `kth_smallest_magnitude_bits`."""
    return bits_to_float(kth_smallest_magnitude_bits(map_chunks, ks, count, reduce))
