"""wudi against a float64 transliteration of fusion_bench's wudi_merging (autograd loss, torch's Adam)."""

import pytest
import torch

import pyfuse

from .method_helpers import SHAPES, assert_relative, random_models, task_vectors


def ref_wudi(task_vectors, iter_num, exclude_keys=()):
    """fusion_bench's wudi_merging on state dicts, in float64."""
    new_vector = {}
    for key in task_vectors[0]:
        tvs = torch.stack([tv[key] for tv in task_vectors])
        merged = torch.nn.Parameter(torch.sum(tvs, dim=0))
        if len(task_vectors[0][key].shape) == 2 and key not in exclude_keys:
            optimizer = torch.optim.Adam([merged], lr=1e-5, weight_decay=0)
            l2_norms = torch.square(torch.norm(tvs.reshape(tvs.shape[0], -1), p=2, dim=-1))
            for _ in range(iter_num):
                product = torch.matmul(merged.unsqueeze(0) - tvs, tvs.transpose(1, 2))
                loss = torch.sum(torch.square(product) / l2_norms.unsqueeze(-1).unsqueeze(-1))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            new_vector[key] = merged.detach()
        else:
            new_vector[key] = merged.detach() / len(tvs)
    return new_vector


# a wide matrix (p > 2 T m): its gradient is summed over the tasks instead of going through A = [p, p]
WUDI_SHAPES = {**SHAPES, "wide.weight": (2, 15)}


def _expected(base, fts, iter_num, exclude_keys=()):
    tvs = [dict(zip(WUDI_SHAPES, vs)) for vs in zip(*(task_vectors(base, fts, k) for k in WUDI_SHAPES))]
    return {k: base[k].double() + v for k, v in ref_wudi(tvs, iter_num, exclude_keys).items()}


@pytest.mark.parametrize("n", [1, 2, 3])
def test_wudi_matches_fusion_bench(n):
    # task vectors of size ~1e-3 as fine-tuning gives: Adam's 1e-5 steps then move the merge visibly
    base, fts = random_models(n, scale=1e-3, shapes=WUDI_SHAPES, base_scale=0)
    merged = pyfuse.merge("wudi", base, fts, iter_num=150, dtype="float32")
    expected = _expected(base, fts, 150)
    assert_relative(merged, expected)
    for key in ("attn.weight", "wide.weight"):
        start = _expected(base, fts, 0)[key]
        moved = float((expected[key] - start).norm() / start.norm())
        assert moved > 0.05 if n > 1 else moved == 0  # one task is its own optimum
    excluded = pyfuse.merge("wudi", base, fts, iter_num=20, exclude_keys=["emb.weight"], dtype="float32")
    assert_relative(excluded, _expected(base, fts, 20, ("emb.weight",)))
    # with a base: its addition (in float32) is the only difference
    shifted, _ = random_models(0, shapes=WUDI_SHAPES)
    moved_fts = [{k: ft[k] + shifted[k] for k in WUDI_SHAPES} for ft in fts]
    merged = pyfuse.merge("wudi", shifted, moved_fts, iter_num=20, dtype="float32")
    expected = {k: shifted[k].double() + v for k, v in _expected(base, fts, 20).items()}
    assert_relative(merged, expected, inputs=[shifted])


def test_wudi_defaults_and_zero_task_vectors():
    base, fts = random_models(2, scale=1e-3, shapes=WUDI_SHAPES, base_scale=0)
    merged = pyfuse.merge("wudi", base, fts, dtype="float32")  # the reference's 400 steps
    assert_relative(merged, _expected(base, fts, 400))
    # a zero task vector: the reference divides by its zero norm (NaN); here its term is left out, which is the
    # reference's result on the other tasks' terms alone (the zero one still counts in the starting sum)
    fts[0]["attn.weight"] = base["attn.weight"].clone()
    merged = pyfuse.merge("wudi", base, fts, iter_num=50, dtype="float32")
    alone = _expected(base, fts[1:], 50)
    assert_relative({"attn.weight": merged["attn.weight"]}, {"attn.weight": alone["attn.weight"]})
    for ft in fts:
        ft["emb.weight"] = base["emb.weight"].clone()
    merged = pyfuse.merge("wudi", base, fts, iter_num=50, dtype="float32")
    assert torch.equal(merged["emb.weight"], base["emb.weight"])
    with pytest.raises(ValueError, match=r"wudi: iter_num must be an integer in \[0, "):
        pyfuse.merge("wudi", base, fts, iter_num=-1)
    with pytest.raises(ValueError, match="wudi: exclude_keys names 'nope'"):
        pyfuse.merge("wudi", base, fts, exclude_keys=["nope"])
