"""The counter-based noise: one stream, bit for bit, in the reference, C++, Triton and Triton's own tl.philox."""

from __future__ import annotations

import pytest
import torch

from pyfuse.ops.philox import concrete_uniform, philox4x32

from . import oracle

# Philox4x32-10 known-answer vectors (counter, key, output) from the algorithm's published test set.
KNOWN_ANSWERS = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]
# (seed, step, first element index): small and large seeds (>= 2^63), steps above 2^31, indices above 2^32.
STREAMS = [(0, 0, 0), (1234, 1, 1000), (2**40 + 7, 2**31 + 5, 2**32 - 20), (2**64 - 1, 2**32 - 1, 2**33 + 3)]


@pytest.mark.parametrize("counter, key, expected", KNOWN_ANSWERS)
def test_known_answers(counter, key, expected):
    seed = key[0] | key[1] << 32
    words = philox4x32(seed, *(torch.tensor([c]) for c in counter))
    assert tuple(int(w) for w in words) == expected
    assert oracle.philox4x32_10(counter, key) == expected


@pytest.mark.parametrize("seed, step, start", STREAMS)
def test_reference_stream_matches_scalar_oracle(seed, step, start):
    u = concrete_uniform(seed, step, start, 40)
    expected = torch.tensor([oracle.uniform(seed, step, start + k) for k in range(40)], dtype=torch.float32)
    assert torch.equal(u, expected)
    assert bool(((u >= 2**-23) & (u <= 1 - 2**-23)).all())


def _tl_philox_uniform(seed: int, step: int, start: int, count: int) -> torch.Tensor:
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(out_ptr, seed, step, start, count, BLOCK: tl.constexpr):
        k = tl.arange(0, BLOCK)
        j = start + k.to(tl.int64)
        c0 = j.to(tl.uint32)
        zero = tl.zeros_like(c0)
        r0, _, _, _ = tl.philox(seed, c0, (j >> 32).to(tl.uint32), zero + step.to(tl.uint32), zero)
        tl.store(out_ptr + k, tl.random.uint_to_uniform_float(r0), mask=k < count)

    out = torch.empty(count)
    kernel[(1,)](out, seed, step, start, count, BLOCK=triton.next_power_of_2(count))
    return out.clamp_(2**-23, 1 - 2**-23)


@pytest.mark.parametrize("seed, step, start", [s for s in STREAMS if s[0] < 2**63])
def test_reference_matches_triton_tl_philox(seed, step, start):
    assert torch.equal(_tl_philox_uniform(seed, step, start, 64), concrete_uniform(seed, step, start, 64))


@pytest.mark.parametrize("seed, step, start", STREAMS)
@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_backend_streams_are_bit_identical(backend, seed, step, start):
    if backend == "cpp":
        from pyfuse.ops import cpp_backend as module
    else:
        from pyfuse.kernels import concrete_merge as module
    assert torch.equal(module.uniform(seed, step, start, 300), concrete_uniform(seed, step, start, 300))


@pytest.mark.parametrize("backend", ["reference", "cpp", "triton"])
def test_public_sample_uniform(backend):
    from pyfuse.ops import sample_uniform

    u = sample_uniform(50, seed=2**63 + 1, step=7, start=2**32 - 10, backend=backend)
    assert torch.equal(u, concrete_uniform(2**63 + 1, 7, 2**32 - 10, 50))
    with pytest.raises(ValueError, match="start"):
        sample_uniform(5, seed=0, start=-1)
