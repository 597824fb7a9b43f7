"""RegMean against its closed form and its objective in float64, and end to end through pyfuse.merge."""

from __future__ import annotations

import json

import pytest
import torch

import pyfuse
from pyfuse.merge import merge_to_dir
from pyfuse.methods import create_method
from pyfuse.stats import Statistics, collect_statistics

from .merge_helpers import load_dir
from .stats_helpers import bert_batches, bert_logits, perturbed, tiny_bert


def _problem(n: int = 3, rows: int = 20, d_in: int = 6, d_out: int = 4, seed: int = 0):
    """A base, n models and n input matrices X_i (float64), with statistics G_i = X_i^T X_i / rows."""
    g = torch.Generator().manual_seed(seed)
    base = {"fc.weight": torch.randn(d_out, d_in, generator=g, dtype=torch.float64),
            "fc.bias": torch.randn(d_out, generator=g, dtype=torch.float64)}
    models = [{k: v + torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in base.items()}
              for _ in range(n)]
    xs = [torch.randn(rows, d_in, generator=g, dtype=torch.float64) * torch.rand(d_in, generator=g) * 3
          for _ in range(n)]
    stats = [Statistics({"gram_in/fc.weight": x.T @ x / rows}, task=f"t{i}", examples=rows, tokens=rows)
             for i, x in enumerate(xs)]
    return base, models, xs, stats


def _objective(w: torch.Tensor, models, xs) -> torch.Tensor:
    return sum(((x @ w.T - x @ m["fc.weight"].T) ** 2).sum() for m, x in zip(models, xs))


@pytest.mark.parametrize("alpha", [1.0, 0.9, 0.3])
def test_regmean_matches_closed_form(alpha):
    base, models, _, stats = _problem()
    merged = create_method("regmean", alpha=alpha).merge_model(base, models, stats)
    grams = [st.get("gram_in", "fc.weight") for st in stats]
    reduced = [alpha * g + (1 - alpha) * torch.diag(torch.diag(g)) for g in grams]
    expected_t = torch.linalg.inv(sum(reduced)) @ sum(r @ m["fc.weight"].T for r, m in zip(reduced, models))
    torch.testing.assert_close(merged["fc.weight"], expected_t.T, rtol=1e-10, atol=1e-10)
    bias = sum(m["fc.bias"] for m in models) / 3
    torch.testing.assert_close(merged["fc.bias"], bias, rtol=1e-12, atol=1e-12)


def test_regmean_weights_scale_each_models_gram():
    base, models, _, stats = _problem()
    weights = [1.0, 3.0, 0.5]
    merged = create_method("regmean", alpha=1.0, weights=weights).merge_model(base, models, stats)
    grams = [w * st.get("gram_in", "fc.weight") for w, st in zip(weights, stats)]
    expected_t = torch.linalg.solve(sum(grams), sum(g @ m["fc.weight"].T for g, m in zip(grams, models)))
    torch.testing.assert_close(merged["fc.weight"], expected_t.T, rtol=1e-10, atol=1e-10)


def test_equal_grams_give_the_average():
    base, models, xs, _ = _problem()
    same = xs[0].T @ xs[0] / 20
    stats = [Statistics({"gram_in/fc.weight": same}, task=f"t{i}", examples=1, tokens=1) for i in range(3)]
    merged = create_method("regmean").merge_model(base, models, stats)
    torch.testing.assert_close(merged["fc.weight"], sum(m["fc.weight"] for m in models) / 3, rtol=1e-10, atol=1e-10)


def test_regmean_minimises_the_objective():
    base, models, xs, stats = _problem()
    merged = create_method("regmean", alpha=1.0).merge_model(base, models, stats)["fc.weight"]
    average = sum(m["fc.weight"] for m in models) / 3
    assert _objective(merged, models, xs) < 0.9 * _objective(average, models, xs)
    w = merged.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(_objective(w, models, xs), w)
    assert grad.abs().max() < 1e-9 * _objective(average, models, xs)


def test_singular_system_keeps_the_average_where_no_task_has_data():
    base, models, xs, _ = _problem(rows=30)
    for x in xs:
        x[:, 2] = 0  # input feature 2 is never active
    stats = [Statistics({"gram_in/fc.weight": x.T @ x}, task=f"t{i}", examples=1, tokens=1) for i, x in enumerate(xs)]
    merged = create_method("regmean", alpha=1.0).merge_model(base, models, stats)["fc.weight"]
    assert torch.isfinite(merged).all()
    torch.testing.assert_close(merged[:, 2], sum(m["fc.weight"][:, 2] for m in models) / 3)
    w = merged.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(_objective(w, models, xs), w)
    assert grad.abs().max() < 1e-8


def test_transposed_conv1d_weights():
    base, models, _, stats = _problem()
    flipped = lambda sd: {"fc.weight": sd["fc.weight"].T.contiguous(), "fc.bias": sd["fc.bias"]}  # noqa: E731
    conv_stats = [Statistics({"gram_in/fc.weight": st.get("gram_in", "fc.weight")}, task=st.task, examples=1,
                             tokens=1, transposed=["fc.weight"]) for st in stats]
    merged = create_method("regmean").merge_model(flipped(base), [flipped(m) for m in models], conv_stats)
    linear = create_method("regmean").merge_model(base, models, stats)
    torch.testing.assert_close(merged["fc.weight"], linear["fc.weight"].T)
    with pytest.raises(ValueError, match=r"'gram_in'.*\[6, 6\], expected \[4, 4\]"):  # Linear Grams on [in, out]
        create_method("regmean").merge_model(flipped(base), [flipped(m) for m in models], stats)
    base, models, _, stats = _problem(d_in=4, d_out=4)  # square: only the transposed flags tell the layouts apart
    conv_stats[0] = Statistics({"gram_in/fc.weight": stats[0].get("gram_in", "fc.weight")}, task="conv",
                               examples=1, tokens=1, transposed=["fc.weight"])
    with pytest.raises(ValueError, match="'fc.weight' is stored transposed .* tasks 'conv' and 't1'"):
        create_method("regmean").merge_model(base, models, [conv_stats[0], stats[1], stats[2]])


def test_regmean_end_to_end_sharded(tmp_path):
    model = tiny_bert()
    base_dir = tmp_path / "base"
    model.save_pretrained(base_dir, max_shard_size="20KB")
    base = {k: v.clone() for k, v in model.state_dict().items()}
    dirs, stats_paths, grams = [], [], []
    for i in range(2):
        state = perturbed(model, 0.05, seed=10 + i)
        model.load_state_dict(state)
        path = tmp_path / f"ft{i}"
        model.save_pretrained(path, max_shard_size="20KB")
        stats = collect_statistics(model, bert_batches(seed=i), bert_logits, kinds=["gram_in"],
                                   token_mask_fn=lambda b: b["attention_mask"], progress=False)
        stats_paths.append(stats.save(tmp_path / f"stats{i}.safetensors"))
        dirs.append(path)
        grams.append(stats)
    merged = pyfuse.merge("regmean", base_dir, dirs, statistics=stats_paths)
    finetuned = [load_dir(d) for d in dirs]
    key = "bert.encoder.layer.1.intermediate.dense.weight"
    g = [0.9 * st.get("gram_in", key).double() + 0.1 * torch.diag(torch.diag(st.get("gram_in", key).double()))
         for st in grams]
    expected_t = torch.linalg.solve(g[0] + g[1], sum(gi @ f[key].double().T for gi, f in zip(g, finetuned)))
    torch.testing.assert_close(merged[key].double(), expected_t.T, rtol=1e-5, atol=1e-6)
    layer_norm = "bert.encoder.layer.0.output.LayerNorm.weight"
    torch.testing.assert_close(merged[layer_norm], (finetuned[0][layer_norm] + finetuned[1][layer_norm]) / 2)
    assert not torch.allclose(merged[key], (finetuned[0][key] + finetuned[1][key]) / 2, atol=1e-4)
    assert set(merged) == set(base) and all(merged[k].dtype == base[k].dtype for k in base)

    out = tmp_path / "merged"
    report = merge_to_dir("regmean", base_dir, dirs, out, statistics=stats_paths, shard_size="4KB", alpha=0.9)
    written = load_dir(out)
    assert len(report["output"]["shards"]) > 1 and (out / "model.safetensors.index.json").exists()
    assert (out / "config.json").exists()
    for k in base:
        assert torch.equal(written[k], merged[k]), k
    saved = json.loads((out / "merge_report.json").read_text())
    assert saved["method"] == "regmean" and [s["task"] for s in saved["statistics"]] == ["task", "task"]
    assert saved["statistics"][0]["kinds"] == ["gram_in"]


def test_regmean_errors_before_work(tmp_path):
    base, models, _, stats = _problem()
    with pytest.raises(ValueError, match="'regmean' needs statistics"):
        pyfuse.merge("regmean", base, models)
    fisher_only = [Statistics({"fisher/fc.weight": torch.ones(4, 6)}, task="f", examples=1, tokens=1)] * 3
    with pytest.raises(ValueError, match="no 'gram_in' statistics"):
        pyfuse.merge("regmean", base, models, statistics=fisher_only)
    wrong = Statistics({"gram_in/fc.weight": torch.eye(4)}, task="w", examples=1, tokens=1)
    with pytest.raises(ValueError, match=r"task 'w'.*'gram_in'.*'fc\.weight'.*\[4, 4\], expected \[6, 6\]"):
        pyfuse.merge("regmean", base, models, statistics=[stats[0], stats[1], wrong])
    with pytest.raises(ValueError, match="alpha"):
        create_method("regmean", alpha=1.5)
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        pyfuse.merge("regmean", base, models, statistics=[tmp_path / "nope.safetensors"] * 3)
