"""The sparsify core in memory: AdaMerging++'s TIES trim against the TIES oracle the static merge is tested with."""

from __future__ import annotations

import pytest
import torch

import pyfuse
from pyfuse.adaptive import RunOptions
from pyfuse.methods.sparsify import ties_trim

from .adaptive_helpers import digits_problem
from .oracle import ties_select


def _ties_trimmed(vectors: torch.Tensor, density: float) -> torch.Tensor:
    """The oracle's kept entries of each task vector (whole-model trim, unit weights), float64."""
    return ties_select(vectors.double(), density)[0]


@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ties_trim_matches_numpy(density, dtype):
    generator = torch.Generator().manual_seed(3)
    # small integers: many ties at the thresholds and coordinates whose trimmed sum is zero
    vectors = torch.randint(-3, 4, (4, 101), generator=generator).to(dtype)
    original = vectors.clone()
    out = ties_trim(vectors, density)
    assert out.dtype == dtype and torch.equal(vectors, original)
    assert torch.equal(out.double(), _ties_trimmed(vectors, density))


def test_ties_trim_rejects_bad_density():
    with pytest.raises(ValueError, match="density"):
        ties_trim(torch.ones(2, 5), 0.0)
    with pytest.raises(ValueError, match=r"\[n, D\]"):
        ties_trim(torch.ones(5), 0.5)


def test_adamerging_pp_merges_the_trimmed_vectors():
    model, tv, tasks = digits_problem()
    result = pyfuse.adamerging_pp(model, tv, tasks, density=0.3, granularity="task", steps=2,
                                  options=RunOptions(progress=False, backend="reference"))
    trimmed = _ties_trimmed(tv.vectors, 0.3)
    expected = tv.base.double() + (result.coefficients.double()[:, None] * trimmed).sum(0)
    torch.testing.assert_close(result.flat.double(), expected, rtol=1e-5, atol=1e-6)
    assert result.report["method"] == "adamerging++" and result.report["settings"]["density"] == 0.3


def test_ties_trim_balanced_model_keeps_the_negative_side():
    # entries 0-1 cancel exactly and the elected signs of the rest balance (+1, -1): s = 0 keeps negatives
    vectors = torch.tensor([[0.5, -0.25, 1.0, -1.0], [-0.5, 0.25, 1.0, -1.0]])
    out = ties_trim(vectors, 1.0)
    assert torch.equal(out.double(), _ties_trimmed(vectors, 1.0))
    assert out[:, :2].tolist() == [[0.0, -0.25], [-0.5, 0.0]]


def test_ties_trim_is_what_the_streaming_ties_merge_sums():
    # one core: the in-memory trim (AdaMerging++) and the chunked TIES merge keep the same entries
    generator = torch.Generator().manual_seed(5)
    vectors = torch.randn(3, 3001, generator=generator)
    base = {"w": torch.zeros(3001)}
    merged = pyfuse.merge("ties", base, [{"w": row} for row in vectors], density=0.3, scaling=1.0)
    torch.testing.assert_close(merged["w"], ties_trim(vectors, 0.3).sum(0), rtol=1e-6, atol=1e-7)
