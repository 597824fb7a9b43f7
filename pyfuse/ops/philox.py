"""Reference Philox-4x32-10 stream and the Concrete noise, written with integer tensor ops.

This is the oracle the Triton (`kernels/philox.py`) and C++ (`csrc/philox.h`) streams must match bit
for bit: counter `(j mod 2^32, j >> 32, step, 0)`, key `(seed lo, seed hi)`, first output word mapped
to a float exactly as `tl.random.uint_to_uniform_float` does, then clamped to `[2^-23, 1 - 2^-23]`.
"""

from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
ROUND_A = 0xD2511F53
ROUND_B = 0xCD9E8D57
KEY_A = 0x9E3779B9
KEY_B = 0xBB67AE85
N_ROUNDS = 10
# Triton's scale for 32-bit words: the largest value with INT32_MAX * scale < 1 in float32.
UNIFORM_SCALE = 4.6566127342e-10
EPS = 2.0**-23


def split_seed(seed: int) -> tuple[int, int]:
    """The two 32-bit key words (lo, hi) of a 64-bit seed in [0, 2^64)."""
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must be an integer in [0, 2^64), got {seed}")
    return seed & MASK32, seed >> 32


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # Split the constant into 16-bit halves so every partial product fits in int64 exactly.
    a_lo, a_hi = a & 0xFFFF, a >> 16
    p_lo = b * a_lo
    p_hi = b * a_hi
    full_lo = (p_lo + ((p_hi & 0xFFFF) << 16)) & MASK32
    hi = (p_hi + (p_lo >> 16)) >> 16
    return hi & MASK32, full_lo


def philox4x32(
    seed: int, c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox-4x32-10 on int64 tensors holding uint32 values; returns the four output words."""
    k0, k1 = split_seed(seed)
    for _ in range(N_ROUNDS):
        hi_b, lo_b = _mulhilo(ROUND_B, c2)
        hi_a, lo_a = _mulhilo(ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + KEY_A) & MASK32
        k1 = (k1 + KEY_B) & MASK32
    return c0, c1, c2, c3


def uint_to_uniform_float(x: torch.Tensor) -> torch.Tensor:
    """Triton's map of a uint32 word to [0, 1): reinterpret as int32, negatives become ~x, times a scale."""
    signed = torch.where(x >= 2**31, x - 2**32, x)
    signed = torch.where(signed < 0, -signed - 1, signed)
    return signed.to(torch.float32) * torch.tensor(UNIFORM_SCALE, dtype=torch.float32)


def concrete_uniform(seed: int, step: int, start: int, count: int, device=None) -> torch.Tensor:
    """The clamped uniform noise u_j for global element indices j in [start, start + count)."""
    if not 0 <= step < 2**32:
        raise ValueError(f"step must be an integer in [0, 2^32), got {step}")
    j = torch.arange(start, start + count, dtype=torch.int64, device=device)
    zeros = torch.zeros_like(j)
    r0, _, _, _ = philox4x32(seed, j & MASK32, j >> 32, zeros + step, zeros)
    return uint_to_uniform_float(r0).clamp_(EPS, 1.0 - EPS)
