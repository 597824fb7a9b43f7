"""Triton device helpers shared by the fused-merge kernels: the Concrete noise stream and the mask.

The stream matches `pyfuse.ops.philox.concrete_uniform` bit for bit: Philox-4x32-10 with counter
`(j mod 2^32, j >> 32, step, 0)` and key `(seed lo, seed hi)`, first output word mapped to a float by
`tl.random.uint_to_uniform_float`, clamped to `[2^-23, 1 - 2^-23]`. For seeds below 2^63 this is
exactly `tl.philox(seed, c0, c1, c2, c3)`; the key words are passed separately so seeds up to 2^64 work.

Kernels receive the seed words and the step as int32 bit patterns (see `seed_args`), so the arguments
always get the same (i32) signature whatever their value, and reinterpret them here as uint32.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl
from triton.language.extra import libdevice
from triton.language.random import philox_impl

# Triton's scale for 32-bit words: the largest value with INT32_MAX * scale < 1 in fp32.
UINT32_TO_UNIFORM = tl.constexpr(4.6566127342e-10)
# Clamp bounds of the uniforms: 2^-23 and 1 - 2^-23, both exact in fp32.
U_MIN = tl.constexpr(2.0**-23)
U_MAX = tl.constexpr(1.0 - 2.0**-23)

# libdevice has no interpreter implementation, so under TRITON_INTERPRET the logs use tl.log (numpy)
# and an accurate log1p built from it; compiled kernels use libdevice's logf/log1pf (~1 ulp), not the
# approximate hardware log that tl.log may lower to.
USE_LIBDEVICE = tl.constexpr(os.environ.get("TRITON_INTERPRET") != "1")

RELAXED = tl.constexpr(0)
HARD = tl.constexpr(1)
THRESHOLD = tl.constexpr(2)
NONE = tl.constexpr(3)

_MASK32 = 0xFFFFFFFF


def as_int32(value: int) -> int:
    """The int32 with the same bit pattern as the uint32 `value`."""
    value &= _MASK32
    return value - (1 << 32) if value >= (1 << 31) else value


def seed_args(seed: int, step: int) -> tuple[int, int, int]:
    """(seed_lo, seed_hi, step) as int32 bit patterns, validated like the reference stream."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise ValueError(f"seed must be an integer in [0, 2^64), got {seed!r}")
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < 2**32:
        raise ValueError(f"step must be an integer in [0, 2^32), got {step!r}")
    return as_int32(seed), as_int32(seed >> 32), as_int32(step)


@triton.jit
def concrete_uniform(seed_lo, seed_hi, step, idx):
    """Clamped fp32 uniforms u_j for the int64 global indices `idx` (any shape)."""
    idx = idx.to(tl.int64)
    c0 = idx.to(tl.uint32)  # truncation: j mod 2^32
    c1 = (idx >> 32).to(tl.uint32)
    zero = tl.zeros_like(c0)
    c2 = zero + tl.cast(step, tl.uint32, bitcast=True)
    k0 = tl.cast(seed_lo, tl.uint32, bitcast=True)
    k1 = tl.cast(seed_hi, tl.uint32, bitcast=True)
    r0, _, _, _ = philox_impl(c0, c1, c2, zero, k0, k1)
    # tl.random.uint_to_uniform_float for uint32, inlined (each nested jit call is costly under the
    # interpreter): reinterpret as int32, map negatives to ~x, scale into [0, 1).
    r = r0.to(tl.int32, bitcast=True)
    u = tl.where(r < 0, ~r, r) * UINT32_TO_UNIFORM
    return tl.minimum(tl.maximum(u, U_MIN), U_MAX)


@triton.jit
def concrete_mask(x, u, temperature, MODE: tl.constexpr):
    """The mask from fp32 logits `x` and uniforms `u` (ignored by the threshold and none modes).

    MODE: 0 relaxed sigmoid((log u - log(1-u) + x) / T), 1 hard (noisy > 0), 2 threshold (x > 0), 3 ones.
    """
    if MODE == NONE:
        m = tl.full(x.shape, 1.0, tl.float32)
    elif MODE == THRESHOLD:
        m = tl.where(x > 0.0, 1.0, 0.0)
    else:
        # log(u) - log1p(-u) + x
        if USE_LIBDEVICE:
            noise = libdevice.log(u) - libdevice.log1p(-u)
        else:
            # No libdevice in the interpreter: w = fl(1 - u) lies in [2^-23, 1 - 2^-23] (u is clamped),
            # so w != 1 and 1 - w is exact; scaling log(w) by u / (1 - w) cancels the rounding of w to
            # first order (Goldberg's log1p), leaving an error of a few ulps.
            w = 1.0 - u
            noise = tl.log(u) - tl.log(w) * (u / (1.0 - w))
        noisy = noise + x
        if MODE == HARD:
            m = tl.where(noisy > 0.0, 1.0, 0.0)
        else:
            # sigmoid(z) without overflow: e = exp(-|z|) <= 1
            z = noisy / temperature
            e = tl.exp(-tl.abs(z))
            m = tl.where(z >= 0.0, 1.0, e) / (1.0 + e)
    return m


@triton.jit
def regenerate_mask(logits_ptr, idx, valid, seed_lo, seed_hi, step, temperature, noise_start, MODE: tl.constexpr):
    """The fp32 mask of the logits at `idx`, its noise drawn at the global indices `noise_start + idx` (the first
    element of a shard of a longer flat model); lanes with `valid` false get an unspecified value.

    Loads the logits only when the mode reads them and runs Philox only for the noisy modes.
    """
    if MODE == NONE:
        m = tl.full(idx.shape, 1.0, tl.float32)
    else:
        x = tl.load(logits_ptr + idx, mask=valid, other=0.0).to(tl.float32)
        if MODE == THRESHOLD:
            m = concrete_mask(x, x, temperature, MODE)
        else:
            u = concrete_uniform(seed_lo, seed_hi, step, tl.cast(noise_start, tl.int64) + idx)
            m = concrete_mask(x, u, temperature, MODE)
    return m
