"""TIES trimming of the flat task-vector buffer, as AdaMerging++ needs it (per-task vectors, not their merge).

SPEC's TIES (the paper's reference): trim each task vector over the whole flattened model to its top
`density` magnitudes (ties at the threshold kept), elect a sign per coordinate from the sum of the trimmed
vectors, and keep only the entries that agree with it.
"""

from __future__ import annotations

import math

import torch


def ties_trim(vectors: torch.Tensor, density: float = 0.2) -> torch.Tensor:
    """The trimmed, sign-agreeing task vectors `[n, D]` (same dtype as `vectors`); the input is not changed.

    Per task i: `k = D - floor(D * density)`, `t_i` = the k-th smallest `|tau_i|`, keep `|tau_ij| >= t_i`.
    Elected sign `s = sign(sum_i trimmed_i)` (fp32 sum), zeros of `s` taking `sign(sum of s)`; an entry is
    kept where it is `> 0` and `s > 0`, or `< 0` and `s < 0`.
    """
    if vectors.dim() != 2:
        raise ValueError(f"vectors must be [n, D], got shape {list(vectors.shape)}")
    if not (isinstance(density, (int, float)) and 0 < density <= 1):
        raise ValueError(f"density must be in (0, 1], got {density!r}")
    numel = vectors.shape[1]
    k = numel - math.floor(numel * density)
    out = vectors.clone()
    for row in out:
        if k > 0:
            magnitude = row.abs().float()
            row.masked_fill_(magnitude < magnitude.kthvalue(k).values, 0)
    elected = out.float().sum(0).sign_()
    elected[elected == 0] = elected.sum().sign()
    for row in out:
        agrees = ((row > 0) & (elected > 0)) | ((row < 0) & (elected < 0))
        row.masked_fill_(~agrees, 0)
    return out
