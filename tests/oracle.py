"""Independent float64 re-derivations of SPEC.md, written with Python integers and numpy only.

Nothing here imports pyfuse: the Philox stream is a scalar re-implementation and the merge and its
gradients follow the SPEC formulas term by term, so agreeing with it means agreeing with the SPEC.
"""

from __future__ import annotations

import numpy as np

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
    """u_j as SPEC.md defines it, as a float32 value."""
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
    """out = b + r * sum_i w tau, and the SPEC's dL/dw and dL/dx for L = sum(g * out)."""
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
