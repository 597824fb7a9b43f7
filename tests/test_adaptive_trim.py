"""TIES trimming for AdaMerging++ against a plain numpy re-derivation of SPEC's TIES."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import pyfuse
from pyfuse.adaptive import RunOptions, ties_trim

from .adaptive_helpers import digits_problem


def _ties_numpy(vectors: np.ndarray, density: float) -> np.ndarray:
    n, numel = vectors.shape
    k = numel - math.floor(numel * density)
    trimmed = vectors.astype(np.float64).copy()
    for row in trimmed:
        if k > 0:
            threshold = np.sort(np.abs(row))[k - 1]
            row[np.abs(row) < threshold] = 0
    elected = np.sign(trimmed.sum(0))
    elected[elected == 0] = np.sign(elected.sum())
    agree = ((trimmed > 0) & (elected > 0)) | ((trimmed < 0) & (elected < 0))
    return np.where(agree, trimmed, 0)


@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ties_trim_matches_numpy(density, dtype):
    generator = torch.Generator().manual_seed(3)
    # small integers: many ties at the thresholds and coordinates whose trimmed sum is zero
    vectors = torch.randint(-3, 4, (4, 101), generator=generator).to(dtype)
    original = vectors.clone()
    out = ties_trim(vectors, density)
    assert out.dtype == dtype and torch.equal(vectors, original)
    np.testing.assert_array_equal(out.double().numpy(), _ties_numpy(vectors.double().numpy(), density))


def test_ties_trim_rejects_bad_density():
    with pytest.raises(ValueError, match="density"):
        ties_trim(torch.ones(2, 5), 0.0)
    with pytest.raises(ValueError, match=r"\[n, D\]"):
        ties_trim(torch.ones(5), 0.5)


def test_adamerging_pp_merges_the_trimmed_vectors():
    model, tv, tasks = digits_problem()
    result = pyfuse.adamerging_pp(model, tv, tasks, density=0.3, granularity="task", steps=2,
                                  options=RunOptions(progress=False, backend="reference"))
    trimmed = torch.tensor(_ties_numpy(tv.vectors.numpy(), 0.3))
    expected = tv.base.double() + (result.coefficients.double()[:, None] * trimmed).sum(0)
    torch.testing.assert_close(result.flat.double(), expected, rtol=1e-5, atol=1e-6)
    assert result.report["method"] == "adamerging++" and result.report["settings"]["density"] == 0.3
