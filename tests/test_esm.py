"""ESM / ESM++: the essential-subspace decomposition, polar orthogonalisation, the merge against an independent
float64 re-derivation (eigendecomposition and scipy's polar), routing, and the experts file round trip."""

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

import pyfuse
from pyfuse.methods import create_method
from pyfuse.methods.esm import (
    LayerExperts,
    RoutedLinear,
    esm_delta,
    essential_subspace,
    install_routed_experts,
    load_experts,
    polar,
    save_experts,
    ternary_search,
    tsv_delta,
)
from pyfuse.stats import Statistics

F64 = torch.float64


def _stats(tensors, task="t"):
    return Statistics(tensors, task=task, examples=8, tokens=8)


# ---------------------------------------------------------------------------------------------
# ESD and polar decomposition
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("samples", [20, 4])  # more samples than outputs, and fewer (rank-deficient shift)
def test_esd_reconstructs_the_activation_shift_at_full_rank(samples):
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(6, 10, generator=g, dtype=F64)
    acts = torch.randn(samples, 10, generator=g, dtype=F64)
    esd = essential_subspace(delta, acts)
    assert esd.basis.shape == (6, min(samples, 6))
    torch.testing.assert_close(esd.basis.T @ esd.basis, torch.eye(esd.basis.shape[1], dtype=F64))
    torch.testing.assert_close(acts @ (esd.basis @ esd.components).T, acts @ delta.T, rtol=0, atol=1e-12)


def test_esd_truncation_error_is_the_sum_of_discarded_eigenvalues():
    g = torch.Generator().manual_seed(1)
    delta = torch.randn(7, 9, generator=g, dtype=F64)
    acts = torch.randn(30, 9, generator=g, dtype=F64)
    shift = acts @ delta.T
    full = essential_subspace(delta, acts)
    # the eigenvalues of the uncentered second moment, by an independent route
    assert torch.allclose(full.energies, torch.linalg.eigvalsh(shift.T @ shift).flip(0), rtol=1e-10)
    for k in range(1, 7):
        esd = essential_subspace(delta, acts, k)
        error = (shift - acts @ (esd.basis @ esd.components).T).square().sum()
        torch.testing.assert_close(error, full.energies[k:].sum(), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("shape", [(6, 6), (8, 3), (3, 8)])
def test_polar_orthogonalisation(shape):
    g = torch.Generator().manual_seed(2)
    m = torch.randn(*shape, generator=g, dtype=F64)
    q = polar(m, scale=False)
    small = min(shape)
    gram = q.T @ q if shape[0] >= shape[1] else q @ q.T
    torch.testing.assert_close(gram, torch.eye(small, dtype=F64))  # a partial isometry
    if shape[0] >= shape[1]:  # scipy's right polar decomposition m = u p, p symmetric positive semi-definite
        u, p = scipy.linalg.polar(m.numpy())
        np.testing.assert_allclose(q.numpy(), u, atol=1e-12)
        torch.testing.assert_close(q.T @ m, torch.from_numpy(p))
    s = torch.linalg.svdvals(m)
    torch.testing.assert_close(torch.linalg.svdvals(polar(m)), s.mean().expand(small))  # flat spectrum at mean(S)


# ---------------------------------------------------------------------------------------------
# The ESM and TSV updates against re-derivations
# ---------------------------------------------------------------------------------------------
def _ref_esm(deltas, acts, exponent=0.15):
    """ESM re-derived in numpy: eigenvectors of dO^T dO instead of an SVD of dO, scipy's polar factor."""
    deltas = [d.numpy() for d in deltas]
    k = deltas[0].shape[0] // len(deltas)
    bases, parts = [], []
    for d, x in zip(deltas, acts):
        shift = x.numpy() @ d.T
        lam, vec = np.linalg.eigh(shift.T @ shift)
        lam, p = lam[::-1][:k], vec[:, ::-1][:, :k]
        a = p.T @ d
        w = (lam / lam.mean()) ** exponent
        aw = w[:, None] * a
        aw *= np.linalg.norm(a) / np.linalg.norm(aw)  # task level
        bases.append(p)
        parts.append(aw)

    def pol(m):
        u, _ = scipy.linalg.polar(m) if m.shape[0] >= m.shape[1] else (scipy.linalg.polar(m.T)[0].T, None)
        return u * np.linalg.svd(m, compute_uv=False).mean()

    merged = pol(np.concatenate(bases, 1)) @ pol(np.concatenate(parts, 0))
    plain = sum(p @ a for p, a in zip(bases, parts))
    merged *= (np.linalg.norm(plain, axis=1) / np.linalg.norm(merged, axis=1))[:, None]  # dimension level
    merged *= np.mean([np.linalg.norm(d) for d in deltas]) / np.linalg.norm(merged)  # layer level
    return torch.from_numpy(merged)


def test_esm_delta_matches_the_reference():
    g = torch.Generator().manual_seed(3)
    deltas = [torch.randn(9, 5, generator=g, dtype=F64) for _ in range(3)]
    acts = [torch.randn(12, 5, generator=g, dtype=F64) + i for i in range(3)]
    merged = esm_delta(deltas, acts)
    torch.testing.assert_close(merged, _ref_esm(deltas, acts), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(merged.norm(), torch.stack([d.norm() for d in deltas]).mean())


def test_tsv_delta_of_tasks_in_orthogonal_subspaces_is_their_sum():
    """Tasks of rank k acting on disjoint row and column blocks: concatenated singular vectors are already
    orthonormal, so the polar step keeps them and the merge is exactly the sum of the tasks."""
    g = torch.Generator().manual_seed(4)
    deltas = []
    for t in range(2):
        d = torch.zeros(8, 6, dtype=F64)
        d[4 * t: 4 * t + 4, 3 * t: 3 * t + 3] = torch.randn(4, 3, generator=g, dtype=F64)  # rank k = 6 // 2
        deltas.append(d)
    torch.testing.assert_close(tsv_delta(deltas), sum(deltas), rtol=0, atol=1e-12)


def test_ternary_search_finds_the_minimum():
    best, seen = ternary_search(lambda a: (a - 0.7) ** 2, 0.0, 2.0, 20)
    assert abs(best - 0.7) < 1e-3 and len(seen) == 41


# ---------------------------------------------------------------------------------------------
# The registered methods on a small MLP with well-separated task inputs
# ---------------------------------------------------------------------------------------------
D_IN, HIDDEN, D_OUT, TASKS = 8, 12, 4, 3


def _mlp():
    return nn.Sequential(nn.Linear(D_IN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, D_OUT))


def _task_inputs(t, g, shape=(40,)):
    mean = torch.zeros(D_IN)
    mean[2 * t: 2 * t + 2] = 6.0  # well-separated input means
    return mean + 0.3 * torch.randn(*shape, D_IN, generator=g)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(5)
    g = torch.Generator().manual_seed(5)
    net = _mlp()
    base = {k: v.detach().clone() for k, v in net.state_dict().items()}
    fts, stats = [], []
    for t in range(TASKS):
        ft = {k: v + 0.3 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        net.load_state_dict(ft)
        x = _task_inputs(t, g)
        with torch.no_grad():
            hidden = net[1](net[0](x))
        fts.append(ft)
        stats.append(_stats({"acts/0.weight": x, "acts/2.weight": hidden}, f"task{t}"))
    return base, fts, stats


def test_esm_merge_alpha_fixed_and_searched(setup):
    base, fts, stats = setup
    method = create_method("esm", alpha=0.5)
    merged = method.merge_model(base, fts, stats)
    taus = {k: [ft[k] - base[k] for ft in fts] for k in base}
    expected = base["0.weight"] + 0.5 * esm_delta(taus["0.weight"], [st.get("acts", "0.weight") for st in stats])
    torch.testing.assert_close(merged["0.weight"], expected)
    torch.testing.assert_close(merged["0.bias"], base["0.bias"] + 0.5 * torch.stack(taus["0.bias"]).mean(0))
    assert method.result["esm"] == ["0.weight", "2.weight"]
    # alpha by ternary search on a validation objective with a known minimiser
    target = base["2.bias"] + 1.3 * torch.stack(taus["2.bias"]).mean(0)
    searched = pyfuse.merge("esm", base, fts, statistics=stats, search_steps=25,
                            objective=lambda sd: float((sd["2.bias"] - target).norm()))
    torch.testing.assert_close(searched["2.bias"], target, rtol=0, atol=1e-4)


def _routed(state, experts):
    model = _mlp()
    model.load_state_dict(state)
    install_routed_experts(model, experts)
    return model


def test_esm_plus_plus_routes_each_task_to_its_expert(setup, tmp_path):
    base, fts, stats = setup
    method = create_method("esm++", experts_path=tmp_path / "experts.safetensors")  # rank 16 >= full rank here
    merged = method.merge_model(base, fts, stats)
    model = _routed(merged, method.experts)
    assert isinstance(model[0], RoutedLinear) and set(model.state_dict()) == set(base)
    g = torch.Generator().manual_seed(6)
    for t in range(TASKS):
        x = _task_inputs(t, g, shape=(5, 3))  # 5 inputs of 3 tokens each: routed per input on the token mean
        with torch.no_grad():
            y = model(x)
        assert model[0].last_route.tolist() == [t] * 5 and model[2].last_route.tolist() == [t] * 5
        reference = _mlp()
        reference.load_state_dict(fts[t])
        with torch.no_grad():  # full-rank experts: the routed model is task t's fine-tuned model
            torch.testing.assert_close(y, reference(x), rtol=1e-5, atol=1e-5)
    # rebuilt from the base architecture with the ESM weights and the saved experts: identical outputs
    rebuilt = _routed(merged, load_experts(tmp_path / "experts.safetensors"))
    x = torch.cat([_task_inputs(t, g, shape=(2, 3)) for t in range(TASKS)])
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))


def test_esm_plus_plus_low_rank_experts_are_truncated_svds(setup, tmp_path):
    base, fts, stats = setup
    method = create_method("esm++", rank=2)
    merged = method.merge_model(base, fts, stats)
    layer = method.experts["2"]
    assert layer.down.shape == (TASKS, 2, HIDDEN) and layer.up.shape == (TASKS, D_OUT, 2)
    for t in range(TASKS):
        residual = (fts[t]["2.weight"] - merged["2.weight"]).double()
        u, s, vh = torch.linalg.svd(residual)
        torch.testing.assert_close((layer.up[t] @ layer.down[t]).double(), (u[:, :2] * s[:2]) @ vh[:2],
                                   rtol=0, atol=1e-5)
        torch.testing.assert_close(layer.prototypes[t], stats[t].get("acts", "2.weight").mean(0))
    path = save_experts(tmp_path / "e.safetensors", method.experts)
    loaded = load_experts(path)
    for name, experts in method.experts.items():
        for field in ("prototypes", "down", "up", "bias"):
            assert torch.equal(getattr(loaded[name], field), getattr(experts, field))


def test_experts_errors():
    model = _mlp()
    good = LayerExperts(torch.zeros(2, D_IN), torch.zeros(2, 1, D_IN), torch.zeros(2, HIDDEN, 1))
    with pytest.raises(ValueError, match="'1'.*ReLU"):
        install_routed_experts(model, {"0": good, "1": good})
    assert not isinstance(model[0], RoutedLinear)  # nothing replaced before the error
    with pytest.raises(ValueError, match="'2'.*\\[4, 12\\]"):
        install_routed_experts(model, {"2": good})
    with pytest.raises(ValueError, match="down has shape"):
        LayerExperts(torch.zeros(2, D_IN), torch.zeros(3, 1, D_IN), torch.zeros(2, HIDDEN, 1))
