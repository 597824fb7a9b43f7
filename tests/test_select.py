"""The radix select over float bits against torch.kthvalue on the concatenated data."""

import pytest
import torch

from pyfuse.methods.select import kth_smallest_magnitude, kth_smallest_magnitude_bits, magnitude_bits


@pytest.fixture(autouse=True)
def _single_thread():
    """As the merge engine runs it (one torch thread per worker); also keeps these small ops off thread barriers."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _mapper(rows: torch.Tensor, sizes):
    """map_chunks over `rows` cut into chunks of the given sizes (cycled)."""
    def map_chunks(fn):
        out, lo, i = [], 0, 0
        while lo < rows.shape[1]:
            hi = min(lo + sizes[i % len(sizes)], rows.shape[1])
            out.append(fn(rows[:, lo:hi].contiguous()))
            lo, i = hi, i + 1
        return out
    return map_chunks


def _expected(rows: torch.Tensor, ks):
    return torch.stack([row.abs().kthvalue(k).values for row, k in zip(rows, ks)])


@pytest.mark.parametrize("sizes", [[61], [1000, 3, 50], [10**6]])
@pytest.mark.parametrize("direct", [False, True], ids=["radix", "direct"])
def test_matches_kthvalue_on_the_concatenation(sizes, direct):
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(3, 4099, generator=g) * torch.logspace(-8, 3, 4099)
    for ks in ([1, 1, 1], [4099, 4099, 4099], [2050, 17, 4000], [1234, 1235, 1236]):
        got = kth_smallest_magnitude(_mapper(rows, sizes), ks, count=4099 if direct else None)
        assert torch.equal(got, _expected(rows, ks)), ks


def test_ties_zeros_signs_and_subnormals():
    g = torch.Generator().manual_seed(1)
    row = torch.randn(3000, generator=g)
    row[:900] = 0.0
    row[900:1500] = 0.25  # many ties, of both signs
    row[1500:1700] = -0.25
    row[1700:1710] = 1e-40  # subnormal magnitudes sort between 0 and the normals
    row[1710:1720] = -0.0
    row = row[torch.randperm(3000, generator=g)]
    rows = torch.stack([row, -row])
    for k in (1, 900, 910, 911, 930, 931, 1500, 1800, 3000):
        got = kth_smallest_magnitude(_mapper(rows, [101]), [k, k])
        assert torch.equal(got, _expected(rows, [k, k])), k


def test_bits_order_is_magnitude_order():
    x = torch.tensor([-3.0, 0.0, -0.0, 1e-45, 2.5, float("inf"), -1e30])
    bits = magnitude_bits(x)
    assert torch.equal(torch.argsort(bits, stable=True), torch.argsort(x.abs(), stable=True))
    assert kth_smallest_magnitude_bits(_mapper(x.unsqueeze(0), [3]), [7]).item() == bits[5].item()


def test_errors():
    rows = torch.randn(2, 10)
    with pytest.raises(ValueError, match=r"row 1: k = 11 is outside \[1, 10\]"):
        kth_smallest_magnitude(_mapper(rows, [4]), [3, 11])
    with pytest.raises(ValueError, match="outside"):
        kth_smallest_magnitude(_mapper(rows, [4]), [0, 1], count=10)
    with pytest.raises(ValueError, match="expected chunks of 3 rows"):
        kth_smallest_magnitude(_mapper(rows, [4]), [1, 1, 1])
    with pytest.raises(ValueError, match="empty"):
        kth_smallest_magnitude(lambda fn: [], [1])
    with pytest.raises(TypeError, match="float32"):
        magnitude_bits(torch.ones(3, dtype=torch.float64))
