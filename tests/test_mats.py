"""Conjugate gradient and MaTS against closed forms and dense float64 solves."""

import pytest
import torch

import pyfuse
from pyfuse.methods import create_method
from pyfuse.methods.cg import conjugate_gradient
from pyfuse.methods.mats import diagonal_fisher_system, kfac_system, regmean_system, regularize_gram
from pyfuse.stats import Statistics, collect_statistics

F64 = torch.float64


def _spd(d, g, rank=None, dtype=F64):
    """A random Gram `X^T X / m` (positive definite unless `rank` < d)."""
    m = rank or 3 * d
    x = torch.randn(m, d, generator=g, dtype=dtype)
    return x.T @ x / m


def _kfac_objective(w, weights, grams_in, grams_out):
    """The paper's `sum_i tr((M - W_i^T)^T A_i (M - W_i^T) S_i)` with `M = W^T`, written in its orientation."""
    m = w.T
    return sum(torch.trace((m - wi.T).T @ a @ (m - wi.T) @ s) for wi, a, s in zip(weights, grams_in, grams_out))


# ---------------------------------------------------------------------------------------------
# CG on the systems, float64
# ---------------------------------------------------------------------------------------------
def test_cg_regmean_converges_to_closed_form():
    g = torch.Generator().manual_seed(0)
    out, d_in, n = 5, 7, 3
    weights = [torch.randn(out, d_in, generator=g, dtype=F64) for _ in range(n)]
    grams = [regularize_gram(_spd(d_in, g), 0.7) for _ in range(n)]
    apply, rhs, dims = regmean_system(grams, weights)
    x0 = torch.randn(out, d_in, generator=g, dtype=F64)
    solved = conjugate_gradient(apply, rhs, x0, iterations=3 * d_in, dims=dims)
    # the paper's closed form, [in, out] orientation: W^T = (sum G_i)^-1 sum G_i W_i^T
    closed = torch.linalg.solve(sum(grams), sum(gi @ wi.T for gi, wi in zip(grams, weights))).T
    torch.testing.assert_close(solved.solution, closed, rtol=0, atol=1e-10)
    assert solved.residual_after < 1e-9 * solved.residual_before


def test_cg_identity_operator_gives_the_average():
    g = torch.Generator().manual_seed(1)
    weights = [torch.randn(4, 6, generator=g, dtype=F64) for _ in range(3)]
    apply, rhs, dims = regmean_system([torch.eye(6, dtype=F64)] * 3, weights)
    solved = conjugate_gradient(apply, rhs, torch.zeros(4, 6, dtype=F64), iterations=5, dims=dims, tol=1e-14)
    torch.testing.assert_close(solved.solution, torch.stack(weights).mean(0), rtol=0, atol=1e-13)
    assert solved.iterations == 1  # C = n I: one step, then the tolerance stops it


def test_cg_diagonal_fisher_is_the_fisher_weighted_average():
    g = torch.Generator().manual_seed(2)
    params = [torch.randn(3, 5, generator=g, dtype=F64) for _ in range(4)]
    fishers = [torch.rand(3, 5, generator=g, dtype=F64) + 0.01 for _ in range(4)]
    apply, rhs, dims = diagonal_fisher_system(fishers, params)
    solved = conjugate_gradient(apply, rhs, torch.zeros(3, 5, dtype=F64), iterations=1, dims=dims)
    expected = sum(f * p for f, p in zip(fishers, params)) / sum(fishers)
    torch.testing.assert_close(solved.solution, expected, rtol=0, atol=1e-13)


def test_cg_kfac_decreases_the_objective_monotonically_to_the_dense_solution():
    g = torch.Generator().manual_seed(3)
    out, d_in, n = 4, 5, 3
    weights = [torch.randn(out, d_in, generator=g, dtype=F64) for _ in range(n)]
    grams_in = [_spd(d_in, g) for _ in range(n)]
    grams_out = [_spd(out, g) for _ in range(n)]
    apply, rhs, dims = kfac_system(grams_in, grams_out, weights)
    values = []
    x0 = torch.stack(weights).mean(0)
    values.append(float(_kfac_objective(x0, weights, grams_in, grams_out)))
    solved = conjugate_gradient(apply, rhs, x0, iterations=out * d_in, dims=dims,
                                callback=lambda k, x: values.append(float(_kfac_objective(x, weights, grams_in,
                                                                                          grams_out))))
    assert len(values) == out * d_in + 1
    assert all(b <= a + 1e-12 * abs(a) for a, b in zip(values, values[1:]))
    assert values[-1] < values[0]
    # dense reference: with row-major vec, vec(A M S) = (A kron S) vec(M) (S symmetric), for M = W^T [in, out]
    big = sum(torch.kron(a, s) for a, s in zip(grams_in, grams_out))
    vec = torch.linalg.solve(big, sum(torch.kron(a, s) @ w.T.reshape(-1)
                                      for a, s, w in zip(grams_in, grams_out, weights)))
    torch.testing.assert_close(solved.solution, vec.view(d_in, out).T, rtol=0, atol=1e-9)


def test_cg_kfac_with_one_task_returns_its_weights():
    g = torch.Generator().manual_seed(4)
    w1 = torch.randn(3, 4, generator=g, dtype=F64)
    apply, rhs, dims = kfac_system([_spd(4, g)], [_spd(3, g)], [w1])
    solved = conjugate_gradient(apply, rhs, torch.zeros_like(w1), iterations=30, dims=dims)
    torch.testing.assert_close(solved.solution, w1, rtol=0, atol=1e-10)


def test_cg_stops_at_tolerance_and_leaves_converged_systems_alone():
    g = torch.Generator().manual_seed(5)
    gram = _spd(6, g)
    w = torch.randn(3, 6, generator=g, dtype=F64)
    exact = torch.linalg.solve(gram, (w @ gram).T).T
    apply, rhs, dims = regmean_system([gram], [w])
    x0 = exact.clone()
    x0[1] += 1.0  # rows 0 and 2 start at the solution: zero residual, their steps must stay 0, not 0/0
    solved = conjugate_gradient(apply, rhs, x0, iterations=50, tol=1e-12, dims=dims)
    assert solved.iterations <= 6 + 1
    assert torch.isfinite(solved.solution).all()
    torch.testing.assert_close(solved.solution, exact, rtol=0, atol=1e-9)


# ---------------------------------------------------------------------------------------------
# The registered method, with Statistics built directly
# ---------------------------------------------------------------------------------------------
def _models(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = {"lin.weight": torch.randn(4, 6, generator=g), "lin.bias": torch.randn(4, generator=g),
            "steps": torch.tensor([7])}
    fts = [{k: v + 0.1 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()
            for k, v in base.items()} for _ in range(n)]
    return base, fts, g


def _stats(tensors, task="t", transposed=()):
    return Statistics(tensors, task=task, examples=10, tokens=10, transposed=transposed)


def test_mats_regmean_matches_closed_form_and_averages_the_rest():
    base, fts, g = _models()
    grams = [_spd(6, g, dtype=torch.float32) for _ in fts]
    stats = [_stats({"gram_in/lin.weight": gr}, f"t{i}") for i, gr in enumerate(grams)]
    method = create_method("mats", objective="regmean", regularization=0.5, iterations=40)
    merged = method.merge_model(base, fts, stats)
    reg = [0.5 * gr.double() + 0.5 * torch.diag(torch.diagonal(gr.double())) for gr in grams]
    closed = torch.linalg.solve(sum(reg), sum(r @ ft["lin.weight"].double().T for r, ft in zip(reg, fts))).T
    torch.testing.assert_close(merged["lin.weight"].double(), closed, rtol=0, atol=1e-5)
    torch.testing.assert_close(merged["lin.bias"], torch.stack([ft["lin.bias"] for ft in fts]).mean(0))
    assert torch.equal(merged["steps"], base["steps"]) and merged["lin.weight"].dtype == torch.float32
    regmean = create_method("regmean", alpha=0.5).merge_model(base, fts, stats)  # the closed-form method agrees
    torch.testing.assert_close(merged["lin.weight"], regmean["lin.weight"], rtol=0, atol=1e-5)
    record = method.result["solved"]["lin.weight"]
    assert record["residual_after"] < 1e-6 * record["residual_before"]
    assert set(method.result["solved"]) == {"lin.weight"}


def test_mats_through_pyfuse_merge_kfac_with_only_one_informative_task():
    base, fts, g = _models()
    # tasks 2 and 3 carry all-zero statistics: they add nothing to sum_i C_i, so the solution is W_1
    stats = [_stats({"gram_in/lin.weight": _spd(6, g, dtype=torch.float32),
                     "gram_out/lin.weight": _spd(4, g, dtype=torch.float32)})]
    stats += [_stats({"gram_in/lin.weight": torch.zeros(6, 6), "gram_out/lin.weight": torch.zeros(4, 4)})] * 2
    merged = pyfuse.merge("mats", base, fts, statistics=stats, objective="kfac", iterations=60)
    torch.testing.assert_close(merged["lin.weight"], fts[0]["lin.weight"], rtol=0, atol=1e-5)


def test_mats_diagonal_fisher_is_the_fisher_weighted_average():
    base, fts, g = _models()
    fishers = [{k: torch.rand(v.shape, generator=g) + 0.05 for k, v in base.items() if v.is_floating_point()}
               for _ in fts]
    stats = [_stats({f"fisher/{k}": v for k, v in f.items()}) for f in fishers]
    method = create_method("mats", objective="diagonal_fisher", iterations=3, init="average")
    merged = method.merge_model(base, fts, stats)
    for name in ("lin.weight", "lin.bias"):
        expected = sum(f[name].double() * ft[name].double() for f, ft in zip(fishers, fts)) / sum(
            f[name].double() for f in fishers)
        torch.testing.assert_close(merged[name].double(), expected, rtol=0, atol=1e-6)


def test_mats_init_model_and_zero_iterations_return_the_start():
    base, fts, g = _models()
    start = {k: v + 1.0 if v.is_floating_point() else v for k, v in base.items()}
    stats = [_stats({"gram_in/lin.weight": _spd(6, g, dtype=torch.float32)}) for _ in fts]
    merged = create_method("mats", objective="regmean", init="model", init_model=start,
                           iterations=0).merge_model(base, fts, stats)
    torch.testing.assert_close(merged["lin.weight"], start["lin.weight"])
    ta = create_method("mats", objective="regmean", init_scaling=0.5, iterations=0).merge_model(base, fts, stats)
    expected = base["lin.weight"] + 0.5 * sum(ft["lin.weight"] - base["lin.weight"] for ft in fts)
    torch.testing.assert_close(ta["lin.weight"], expected)


def test_mats_conv1d_orientation():
    """A weight stored [in, out] (Conv1D) with its Grams still [in, in]: the closed form transposed."""
    g = torch.Generator().manual_seed(6)
    base = {"c.weight": torch.randn(6, 4, generator=g, dtype=F64)}
    fts = [{"c.weight": base["c.weight"] + torch.randn(6, 4, generator=g, dtype=F64)} for _ in range(2)]
    grams = [_spd(6, g) for _ in fts]
    stats = [_stats({"gram_in/c.weight": gr}, transposed=["c.weight"]) for gr in grams]
    merged = create_method("mats", objective="regmean", regularization=1.0, iterations=30).merge_model(base, fts, stats)
    closed = torch.linalg.solve(sum(grams), sum(gr @ ft["c.weight"] for gr, ft in zip(grams, fts)))
    torch.testing.assert_close(merged["c.weight"], closed, rtol=0, atol=1e-10)


def test_mats_errors_before_work():
    base, fts, g = _models()
    with pytest.raises(ValueError, match="gram_in.*lin.weight"):
        create_method("mats", objective="regmean").merge_model(
            base, fts, [_stats({"gram_in/lin.weight": torch.eye(4)}) for _ in fts])
    with pytest.raises(ValueError, match="init_model"):
        create_method("mats", init="model")
    with pytest.raises(ValueError, match="init_model tensor 'lin.bias'"):
        create_method("mats", objective="regmean", init="model", init_model={"lin.weight": base["lin.weight"]}
                      ).merge_model(base, fts, [_stats({"gram_in/lin.weight": torch.eye(6)}) for _ in fts])


def test_mats_regmean_on_collected_statistics_of_a_small_mlp():
    torch.manual_seed(7)
    net = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    base = {k: v.detach().clone() for k, v in net.state_dict().items()}
    inputs = [torch.randn(2, 16, 5) + i for i in range(2)]  # two batches of 16 per task, different means
    fts, stats = [], []
    for x in inputs:
        with torch.no_grad():
            for p in net.parameters():
                p.copy_(p + 0.1 * torch.randn_like(p))
        fts.append({k: v.detach().clone() for k, v in net.state_dict().items()})
        stats.append(collect_statistics(net, list(x), kinds=("gram_in",), progress=False))
        net.load_state_dict(base)
    merged = create_method("mats", objective="regmean", regularization=1.0, iterations=30).merge_model(base, fts, stats)
    # the first layer's Gram from the raw inputs, by hand
    grams = [x.reshape(-1, 5).double().T @ x.reshape(-1, 5).double() / 32 for x in inputs]
    closed = torch.linalg.solve(sum(grams), sum(gr @ ft["0.weight"].double().T for gr, ft in zip(grams, fts))).T
    torch.testing.assert_close(merged["0.weight"].double(), closed, rtol=0, atol=1e-5)
