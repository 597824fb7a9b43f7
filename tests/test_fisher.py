"""The fisher merge against its formula in float64, its normalisations, and DataMethod's checks."""

from __future__ import annotations

import pytest
import torch

import pyfuse
from pyfuse.methods import create_method
from pyfuse.stats import Statistics


def _family(n: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    base = {"a.weight": torch.randn(4, 3, generator=g, dtype=torch.float64),
            "a.bias": torch.randn(4, generator=g, dtype=torch.float64),
            "steps": torch.arange(3)}
    models = [{k: (v + torch.randn(v.shape, generator=g, dtype=torch.float64)) if v.is_floating_point() else v
               for k, v in base.items()} for _ in range(n)]
    fishers = [{"a.weight": torch.rand(4, 3, generator=g, dtype=torch.float64) ** 3} for _ in range(n)]
    stats = [Statistics({f"fisher/{k}": v for k, v in f.items()}, task=f"t{i}", examples=10, tokens=10)
             for i, f in enumerate(fishers)]
    return base, models, fishers, stats


@pytest.mark.parametrize("normalize", ["none", "l2", "sum"])
def test_fisher_merge_matches_formula(normalize):
    base, models, fishers, stats = _family()
    weights = [1.0, 2.0, 0.5]
    merged = create_method("fisher", normalize=normalize, epsilon=1e-3, weights=weights).merge_model(
        base, models, stats)
    norms = {"none": [1.0] * 3, "l2": [f["a.weight"].norm().item() for f in fishers],
             "sum": [f["a.weight"].sum().item() for f in fishers]}[normalize]
    c = [w / n for w, n in zip(weights, norms)]
    f = [fi["a.weight"] + 1e-3 for fi in fishers]
    expected = sum(ci * fi * m["a.weight"] for ci, fi, m in zip(c, f, models)) / sum(ci * fi for ci, fi in zip(c, f))
    torch.testing.assert_close(merged["a.weight"], expected, rtol=1e-12, atol=1e-12)
    # no Fisher for the bias: the weighted average of the models
    average = sum(w * m["a.bias"] for w, m in zip(weights, models)) / sum(weights)
    torch.testing.assert_close(merged["a.bias"], average, rtol=1e-12, atol=1e-12)
    assert torch.equal(merged["steps"], base["steps"])
    assert {k: v.dtype for k, v in merged.items()} == {k: v.dtype for k, v in base.items()}


def test_fisher_follows_the_confident_model():
    base, models, fishers, stats = _family(n=2)
    confident = [Statistics({"fisher/a.weight": torch.full((4, 3), 1e6, dtype=torch.float64)}, task="x", examples=1,
                            tokens=1), stats[1]]
    merged = create_method("fisher").merge_model(base, models, confident)
    torch.testing.assert_close(merged["a.weight"], models[0]["a.weight"], rtol=1e-5, atol=1e-5)
    equal = [Statistics({"fisher/a.weight": fishers[0]["a.weight"]}, task=f"t{i}", examples=1, tokens=1)
             for i in range(2)]
    merged = create_method("fisher").merge_model(base, models, equal)
    torch.testing.assert_close(merged["a.weight"], (models[0]["a.weight"] + models[1]["a.weight"]) / 2)


def test_fisher_through_pyfuse_merge_with_saved_statistics(tmp_path):
    base, models, _, stats = _family()
    paths = [st.save(tmp_path / f"s{i}.safetensors") for i, st in enumerate(stats)]
    direct = create_method("fisher", normalize="l2").merge_model(base, models, stats)
    merged = pyfuse.merge("fisher", base, models, statistics=paths, normalize="l2")
    for key in base:
        torch.testing.assert_close(merged[key], direct[key], rtol=0, atol=0)


def test_checks_name_task_kind_key_and_shapes():
    base, models, _, stats = _family()
    method = create_method("fisher")
    with pytest.raises(ValueError, match=r"one per fine-tuned model \(3\), got 2"):
        method.merge_model(base, models, stats[:2])
    with pytest.raises(ValueError, match="fisher.*statistics"):
        pyfuse.merge("fisher", base, models)
    with pytest.raises(ValueError, match="static merge; it takes no statistics"):
        pyfuse.merge("average", base, models, statistics=stats)
    wrong = Statistics({"fisher/a.weight": torch.ones(3, 4)}, task="odd", examples=1, tokens=1)
    with pytest.raises(ValueError, match=r"task 'odd'.*'fisher'.*'a\.weight'.*\[3, 4\].*\[4, 3\]"):
        method.merge_model(base, models, [stats[0], wrong, stats[2]])
    grams = Statistics({"gram_in/a.weight": torch.eye(3)}, task="grams", examples=1, tokens=1)
    with pytest.raises(ValueError, match=r"task 'grams'.*no 'fisher' statistics \(it has gram_in\)"):
        method.merge_model(base, models, [stats[0], stats[1], grams])
    partial = Statistics({"fisher/a.weight": torch.ones(4, 3), "fisher/a.bias": torch.ones(4)}, task="more",
                         examples=1, tokens=1)
    with pytest.raises(ValueError, match=r"task 'more'.*'a\.bias' is only in task 'more'"):
        method.merge_model(base, models, [stats[0], partial, stats[2]])
    stranger = Statistics({"fisher/b.weight": torch.ones(4, 3)}, task="s", examples=1, tokens=1)
    with pytest.raises(KeyError, match=r"'b\.weight', which is not a floating parameter"):
        method.merge_model(base, models, [stranger] * 3)
    with pytest.raises(ValueError, match="weights has 2 entries"):
        create_method("fisher", weights=[1, 2]).merge_model(base, models, stats)
    zero = Statistics({"fisher/a.weight": torch.zeros(4, 3)}, task="z", examples=1, tokens=1)
    with pytest.raises(ValueError, match="task 'z'.*normalize='sum' needs a positive"):
        create_method("fisher", normalize="sum").merge_model(base, models, [stats[0], stats[1], zero])
