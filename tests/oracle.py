"""Independent re-derivations of the math in docs/, written with Python integers, numpy and plain torch ops.

Nothing here imports pyfuse: the Philox stream is a scalar re-implementation and the merge and its
gradients follow the formulas of docs/concrete-merge.md term by term (float64), and the TIES selection
follows docs/static-methods.md on whole vectors, so agreeing with them means agreeing with the docs.
"""

from __future__ import annotations

import numpy as np
import torch

M32 = 0xFFFFFFFF


def philox4x32_10(counter: tuple[int, int, int, int], key: tuple[int, int]) -> tuple[int, int, int, int]:
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(10):
        p0 = 0xD2511F53 * c0
        p2 = 0xCD9E8D57 * c2
        c0, c1, c2, c3 = ((p2 >> 32) ^ c1 ^ k0) & M32, p2 & M32, ((p0 >> 32) ^ c3 ^ k1) & M32, p0 & M32
        k0, k1 = (k0 + 0x9E3779B9) & M32, (k1 + 0xBB67AE85) & M32
    return c0, c1, c2, c3


def uniform(seed: int, step: int, j: int) -> float:
    """u_j as docs/concrete-merge.md defines it, as a float32 value."""
    word = philox4x32_10((j & M32, j >> 32, step, 0), (seed & M32, seed >> 32))[0]
    signed = word - 2**32 if word >= 2**31 else word
    signed = ~signed if signed < 0 else signed
    u = np.float32(signed) * np.float32(4.6566127342e-10)
    eps = np.float32(2.0**-23)
    return float(min(max(u, eps), np.float32(1) - eps))


def mask(logits: np.ndarray, seed: int, step: int, temperature: float, mode: str) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float64)
    if mode == "none":
        return np.ones_like(x)
    if mode == "threshold":
        return (x > 0).astype(np.float64)
    u = np.array([uniform(seed, step, j) for j in range(len(x))], dtype=np.float64)
    z = np.log(u) - np.log(1 - u) + x
    if mode == "hard":
        return (z > 0).astype(np.float64)
    return 1 / (1 + np.exp(-z / temperature))


def merge_and_grads(base, tv, logits, weights, offsets, g, *, seed, step, temperature, mode, rescale):
    """out = b + r * sum_i w tau, and dL/dw and dL/dx for L = sum(g * out) (docs/concrete-merge.md)."""
    tv = np.asarray(tv, dtype=np.float64)
    n, D = tv.shape
    S = len(offsets) - 1
    w = np.asarray(weights, dtype=np.float64)
    w = np.repeat(w[:, None], S, axis=1) if w.ndim == 1 else w
    m = mask(logits, seed, step, temperature, mode)
    out = np.empty(D)
    grad_w = np.zeros((n, S))
    grad_x = np.zeros(D)
    for s in range(S):
        lo, hi = offsets[s], offsets[s + 1]
        ms, gs, ts = m[lo:hi], g[lo:hi], tv[:, lo:hi]
        a = (w[:, s : s + 1] * ts).sum(0)
        M = ms.mean()
        if not rescale:
            r, dm = ms, gs * a
        elif M > 0:
            r = ms / M
            dm = gs * a / M - (gs * a * ms).sum() / ((hi - lo) * M * M)
        else:
            r, dm = np.zeros_like(ms), np.zeros_like(ms)
        out[lo:hi] = base[lo:hi] + r * a
        grad_w[:, s] = (gs * ts * r).sum(1)
        if mode == "relaxed":
            grad_x[lo:hi] = dm * ms * (1 - ms) / temperature
    return out, grad_w, grad_x


def ties_select(tau: torch.Tensor, density: float, trim: str = "global", weights: torch.Tensor | None = None,
                segments: list[tuple[int, int]] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TIES on task vectors `tau` `[n, D]` (in their dtype): per task, keep |tau| >= the k-th smallest
    (over the whole vector, or each `segments` span with trim="tensor"), weight, elect
    `s = sign(sum)` (zeros: the sign of the summed signs, or +1 with trim="tensor"), keep the entries
    agreeing with s (s = 0 keeps the negative ones). Returns (the kept weighted entries, where kept, s)."""
    n, numel = tau.shape
    w = torch.ones(n, dtype=tau.dtype) if weights is None else weights.to(tau.dtype)
    keep = torch.zeros_like(tau, dtype=torch.bool)
    for a, z in segments if trim == "tensor" else [(0, numel)]:
        count = z - a
        kept = int(count * density)
        k = count - kept if trim == "global" else count - max(1, kept) + 1
        for i in range(n):
            mag = tau[i, a:z].abs()
            keep[i, a:z] = mag >= (mag.kthvalue(k).values if k > 0 else 0)
    trimmed = tau * keep * w[:, None]
    s = torch.sign(trimmed.sum(0))
    s[s == 0] = torch.sign(s.sum()) if trim == "global" else 1.0
    agree = torch.where(s > 0, trimmed > 0, trimmed < 0)
    return trimmed * agree, agree, s
