"""breadcrumbs, DELLA (mergekit) and MagMax (fusion_bench) against float64 re-derivations of the references'
formulas, tensor by tensor, on small random models: defaults, variants, corner cases and bad input."""

import math

import pytest
import torch
import yaml
from safetensors.torch import save_file

import pyfuse
from pyfuse.cli import main
from pyfuse.merge import plan_merge
from pyfuse.methods import create_method
from pyfuse.ops.philox import concrete_uniform

from .merge_helpers import load_dir

# every kind of parameter: matrices, a conv-like 4-D tensor, vectors, rows of one entry, one tensor large
# enough (> 100 entries) for gamma = 0.01 to remove its top entry; sorted, as the engine lays them out
SHAPES = {"b1": (11,), "col": (4, 1), "conv": (3, 4, 2, 2), "emb": (13, 7), "norm": (5,), "w1": (20, 15)}


def _models(n=3, seed=0, ties=False):
    g = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    base["ids"] = torch.arange(6)  # an integer buffer: carried, never merged
    fts = []
    for _ in range(n):
        if ties:  # exact task vectors of a few magnitudes: ties everywhere, zero sums, zero entries
            ft = {k: v + torch.randint(-2, 3, v.shape, generator=g).float() for k, v in base.items() if k != "ids"}
        else:
            ft = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items() if k != "ids"}
        ft["ids"] = base["ids"].clone()
        fts.append(ft)
    return base, fts


def _offsets():
    out, lo = {}, 0
    for k, s in SHAPES.items():
        out[k] = lo
        lo += math.prod(s)
    return out


def _task_vectors(base, fts, key):
    """fp32 task vectors, as both references compute them (fine-tuned minus base in the models' dtype)."""
    return [ft[key] - base[key] for ft in fts]


def _close(merged, expected):
    for k, v in expected.items():
        torch.testing.assert_close(merged[k].double(), v, rtol=1e-6, atol=1e-6)
    assert torch.equal(merged["ids"], torch.arange(6))


# ---------------------------------------------------------------------------------------------
# mergekit, re-derived: generalized task arithmetic over sparsified task vectors (float64)
# ---------------------------------------------------------------------------------------------
def mk_combine(base, deltas, weights, consensus, normalize, lam):
    deltas = torch.stack([d.double() for d in deltas])
    w = torch.tensor(weights, dtype=torch.float64).view(-1, *[1] * (deltas.dim() - 1))
    weighted = deltas * w
    if consensus:
        majority = torch.where(weighted.sum(0) >= 0, 1.0, -1.0).double()
        mask = (weighted.sign() == majority).double()
        mixed = (weighted * mask).sum(0)
        divisor = (w * mask).sum(0)
        divisor[divisor == 0] = 1
    else:
        mixed = weighted.sum(0)
        divisor = w.sum()
        if divisor.abs() < 1e-8:
            divisor = torch.ones((), dtype=torch.float64)
    if normalize:
        mixed = mixed / divisor
    return base.double() + lam * mixed


def mk_rescale(delta, mask, rescale):
    masked = delta.double() * mask
    if not rescale:
        return masked
    before, after = delta.double().abs().sum(), masked.abs().sum()
    return masked if before < 1e-7 or after < 1e-7 else masked * (before / after)


def mk_band(delta, density, gamma, ties_included):
    """mergekit's magnitude_outliers mask: sort ascending by |x|, keep positions [n_bot, m - n_top).

    With `ties_included`, every entry tied with the band's ends is kept (pyfuse's rule; mergekit's
    unstable sort keeps an arbitrary subset of them). n_top = 0 keeps up to the largest (mergekit's
    `[n_bot:-0]` keeps nothing: pyfuse's one departure, tested on its own below)."""
    m = delta.numel()
    if density >= 1:
        return torch.ones(delta.shape, dtype=torch.float64)
    target, n_top = int(density * m), int(gamma * m)
    n_bot = m - target - n_top
    if n_bot < 0:
        n_top, n_bot = n_top + n_bot, 0
    magnitude = delta.abs().reshape(-1)
    mask = torch.zeros(m, dtype=torch.float64)
    if n_bot >= m - n_top:
        return mask.view(delta.shape)
    values, order = torch.sort(magnitude, stable=True)
    if ties_included:
        mask[(magnitude >= values[n_bot]) & (magnitude <= values[m - n_top - 1])] = 1
    else:
        mask[order[n_bot: m - n_top]] = 1
    return mask.view(delta.shape)


def ref_breadcrumbs(base, fts, density=1.0, gamma=0.01, lam=1.0, consensus=False, normalize=False,
                    rescale=False, weights=None, ties_included=False):
    weights = weights or [1.0] * len(fts)
    out = {}
    for key in SHAPES:
        deltas = [mk_rescale(d, mk_band(d, density, gamma, ties_included), rescale)
                  for d in _task_vectors(base, fts, key)]
        out[key] = mk_combine(base[key], deltas, weights, consensus, normalize, lam)
    return out


def mk_della_mask(delta, density, epsilon, seed, task, start):
    """mergekit's della_magprune mask, its Bernoulli draw replaced by the keyed Philox uniforms: probabilities
    in fp32 by mergekit's arithmetic, ranks along dimension 1 (a vector is one row), ties by position."""
    if density >= 1:
        return torch.ones(delta.shape, dtype=torch.float64)
    if density <= 0:
        return torch.zeros(delta.shape, dtype=torch.float64)
    t = delta if delta.dim() >= 2 else delta.unsqueeze(0)
    ranks = t.abs().argsort(dim=1, stable=True).argsort(dim=1).float() + 1
    low, high = ranks.min(dim=1, keepdim=True).values, ranks.max(dim=1, keepdim=True).values
    if t.shape[1] == 1:  # mergekit divides 0 by 0 here; pyfuse keeps the entry with probability density
        probs = torch.full_like(t, density)
    else:
        probs = (density - epsilon) + ((ranks - low) / (high - low)).clamp(0, 1) * 2 * epsilon
    u = concrete_uniform(seed, task, start, delta.numel()).view(t.shape)
    return (u < probs).double().view(delta.shape)


def ref_della(base, fts, density=1.0, epsilon=0.15, lam=1.0, consensus=True, normalize=None, rescale=True,
              seed=0, weights=None):
    weights = weights or [1.0] * len(fts)
    normalize = consensus if normalize is None else normalize
    offsets, out = _offsets(), {}
    for key in SHAPES:
        deltas = [mk_rescale(d, mk_della_mask(d, density, epsilon, seed, i, offsets[key]), rescale)
                  for i, d in enumerate(_task_vectors(base, fts, key))]
        out[key] = mk_combine(base[key], deltas, weights, consensus, normalize, lam)
    return out


# ---------------------------------------------------------------------------------------------
# fusion_bench's MagMax, re-derived
# ---------------------------------------------------------------------------------------------
def ref_magmax(base, fts, scaling=0.5):
    out = {}
    for key in SHAPES:
        deltas = [d.double() for d in _task_vectors(base, fts, key)]
        best = deltas[0]
        for d in deltas[1:]:
            best = torch.where(d.abs() >= best.abs(), d, best)
        out[key] = base[key].double() + scaling * best
    return out


# ---------------------------------------------------------------------------------------------
# breadcrumbs
# ---------------------------------------------------------------------------------------------
BREADCRUMBS = [
    {},  # mergekit's defaults: density 1 keeps everything, gamma ignored; lambda 1, no normalize
    {"density": 0.5, "gamma": 0.1},
    {"density": 0.3, "gamma": 0.01},
    {"density": 0.9, "gamma": 0.3},  # n_bot < 0: fewer of the largest removed
    {"density": 0.6, "gamma": 0.1, "consensus": True},  # breadcrumbs_ties
    {"density": 0.6, "gamma": 0.1, "consensus": True, "normalize": True, "weights": [0.5, -1.0, 2.0]},
    {"density": 0.5, "gamma": 0.1, "rescale": True, "lambda": 0.7, "normalize": True, "weights": [1.0, 2.0, 0.5]},
    {"density": 0.0, "gamma": 0.1},  # keeps nothing: the base
    {"density": 1.0, "gamma": 0.5, "consensus": True},
]


@pytest.mark.parametrize("params", BREADCRUMBS, ids=lambda p: "-".join(f"{k}={v}" for k, v in p.items()) or "defaults")
def test_breadcrumbs_matches_mergekit(params):
    base, fts = _models()
    merged = pyfuse.merge("breadcrumbs", base, fts, **params)
    ref = {("lam" if k == "lambda" else k): v for k, v in params.items()}
    _close(merged, ref_breadcrumbs(base, fts, **ref))


@pytest.mark.parametrize("consensus", [False, True])
def test_breadcrumbs_magnitude_ties_and_zero_task_vectors(consensus):
    base, fts = _models(ties=True)
    fts[1] = {k: v.clone() for k, v in base.items()}  # a zero task vector
    for density, gamma in [(0.5, 0.1), (0.3, 0.2), (0.7, 0.0)]:
        merged = pyfuse.merge("breadcrumbs", base, fts, density=density, gamma=gamma, consensus=consensus,
                              rescale=True)
        _close(merged, ref_breadcrumbs(base, fts, density, gamma, consensus=consensus, rescale=True,
                                       ties_included=True))
    # unscaled integers: elected sums of exactly 0, which mergekit counts as positive
    merged = pyfuse.merge("breadcrumbs", base, fts, density=0.8, gamma=0.1, consensus=consensus)
    _close(merged, ref_breadcrumbs(base, fts, 0.8, 0.1, consensus=consensus, ties_included=True))


@pytest.mark.parametrize("scale,restored", [(1e-9, True), (1e-10, False)])
def test_rescale_leaves_norms_below_its_epsilon(scale, restored):
    # before = 1275 * scale, after = 710 * scale (ranks 26..45 of 50 kept): restored unless one is < 1e-7
    base = {"v": torch.zeros(50)}
    ft = {"v": scale * torch.arange(1, 51, dtype=torch.float64)}
    merged = pyfuse.merge("breadcrumbs", base, [{"v": ft["v"].float()}], density=0.4, gamma=0.1, rescale=True)
    kept = torch.where((ft["v"] >= 26 * scale) & (ft["v"] <= 45 * scale * (1 + 1e-9)), ft["v"], 0.0)
    expected = kept * (1275 / 710) if restored else kept
    torch.testing.assert_close(merged["v"].double(), expected, rtol=1e-6, atol=0)


def test_breadcrumbs_band_is_mergekits_selection_without_ties():
    # the tie-inclusive band and mergekit's sorted-position slice are the same mask when magnitudes differ
    g = torch.Generator().manual_seed(1)
    delta = torch.randn(20, 15, generator=g)
    for density, gamma in [(0.5, 0.1), (0.2, 0.05), (0.95, 0.2)]:
        assert torch.equal(mk_band(delta, density, gamma, False), mk_band(delta, density, gamma, True))
    # with n_top = 0 mergekit's slice [n_bot:-0] keeps nothing; pyfuse keeps the top of the band instead
    base = {"v": torch.zeros(50)}
    ft = {"v": torch.arange(1, 51, dtype=torch.float32)}
    merged = pyfuse.merge("breadcrumbs", base, [ft], density=0.4, gamma=0.01)  # 0.01 * 50 < 1: n_top = 0
    assert torch.equal(merged["v"], torch.where(ft["v"] > 30, ft["v"], 0.0))


def test_breadcrumbs_two_pass_select_on_a_large_tensor():
    # > 2^16 entries: the cuts come from the two-pass histogram select, chunked
    g = torch.Generator().manual_seed(2)
    base = {"big": torch.randn(300, 250, generator=g)}
    fts = [{"big": base["big"] + 0.1 * torch.randn(300, 250, generator=g)} for _ in range(2)]
    merged = plan_merge("breadcrumbs", base, fts, chunk_elements=4096, threads=2, density=0.2,
                        gamma=0.01, consensus=True).state_dict()
    deltas = [mk_band(ft["big"] - base["big"], 0.2, 0.01, False) * (ft["big"] - base["big"]).double() for ft in fts]
    torch.testing.assert_close(merged["big"].double(), mk_combine(base["big"], deltas, [1.0, 1.0], True, False, 1.0),
                               rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# DELLA
# ---------------------------------------------------------------------------------------------
DELLA = [
    {},  # mergekit's defaults: density 1 keeps everything; TIES consensus, normalize, rescale, lambda 1
    {"density": 0.5},
    {"density": 0.4, "epsilon": 0.3, "seed": 11},
    {"density": 0.5, "consensus": False},  # della_linear: no normalize by default
    {"density": 0.5, "consensus": False, "normalize": True, "weights": [1.0, 0.5, 2.0], "lambda": 0.8},
    {"density": 0.6, "epsilon": 0.05, "rescale": False, "weights": [0.5, -1.0, 2.0]},
    {"density": 0.5, "consensus": False, "normalize": True, "weights": [1.0, -1.0, 0.0]},  # weights sum to 0
    {"density": 0.0},  # every task vector dropped: the base
]


@pytest.mark.parametrize("params", DELLA, ids=lambda p: "-".join(f"{k}={v}" for k, v in p.items()) or "defaults")
def test_della_matches_mergekit(params):
    base, fts = _models(seed=4)
    merged = pyfuse.merge("della", base, fts, **params)
    ref = {("lam" if k == "lambda" else k): v for k, v in params.items()}
    _close(merged, ref_della(base, fts, **ref))


def test_della_magnitude_ties_zero_task_vectors_and_chunking():
    base, fts = _models(seed=6, ties=True)
    fts[0] = {k: v.clone() for k, v in base.items()}  # a zero task vector: rescale leaves it alone
    expected = ref_della(base, fts, density=0.5, epsilon=0.2, seed=3)
    _close(pyfuse.merge("della", base, fts, density=0.5, epsilon=0.2, seed=3), expected)
    _close(pyfuse.merge("della", base, fts, density=0.5, epsilon=0.2, seed=3, rescale=False),
           ref_della(base, fts, density=0.5, epsilon=0.2, seed=3, rescale=False))  # sums of exactly 0
    # chunks smaller than a row still hold whole rows; any chunk size and thread count draw the same
    for chunk, threads in [(1, 1), (7, 2), (1000, 2)]:
        small = plan_merge("della", base, fts, chunk_elements=chunk, threads=threads, density=0.5, epsilon=0.2,
                           seed=3).state_dict()
        _close(small, expected)


def test_della_keep_rate_follows_the_rank():
    # one row of 20000 distinct magnitudes: the kept fraction rises from density - eps to density + eps
    base = {"row": torch.zeros(20000)}
    ft = {"row": torch.linspace(1.0, 2.0, 20000)}
    merged = pyfuse.merge("della", base, [ft], density=0.5, epsilon=0.3, rescale=False)["row"]
    kept = (merged != 0).float()
    low, high = kept[:2000].mean(), kept[-2000:].mean()  # expected 0.23 and 0.77, sd about 0.0095
    assert abs(float(low) - 0.23) < 0.06 and abs(float(high) - 0.77) < 0.06
    assert abs(float(kept.mean()) - 0.5) < 0.02


# ---------------------------------------------------------------------------------------------
# MagMax
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 3])
def test_magmax_matches_fusion_bench(n):
    base, fts = _models(n, seed=8)
    _close(pyfuse.merge("magmax", base, fts), ref_magmax(base, fts))
    _close(pyfuse.merge("magmax", base, fts, scaling=1.3), ref_magmax(base, fts, 1.3))


def test_magmax_ties_go_to_the_later_model():
    base = {"v": torch.zeros(4)}
    fts = [{"v": torch.tensor([1.0, -2.0, 0.0, 3.0])}, {"v": torch.tensor([-1.0, 2.0, 0.0, -1.0])}]
    assert pyfuse.merge("magmax", base, fts, scaling=1.0)["v"].tolist() == [-1.0, 2.0, 0.0, 3.0]
    base, fts = _models(3, seed=9, ties=True)
    fts[2] = {k: v.clone() for k, v in base.items()}  # a zero task vector never wins but a tie at 0
    _close(pyfuse.merge("magmax", base, fts), ref_magmax(base, fts))


# ---------------------------------------------------------------------------------------------
# The engine's contract and bad input
# ---------------------------------------------------------------------------------------------
ALL = [("breadcrumbs", {"density": 0.5, "gamma": 0.1, "rescale": True}),
       ("breadcrumbs", {"density": 0.5, "consensus": True}),
       ("della", {"density": 0.5}), ("della", {"density": 0.5, "consensus": False}), ("magmax", {})]


@pytest.mark.parametrize("method,params", ALL, ids=[m + "-" + "-".join(p) for m, p in ALL])
def test_inputs_untouched_chunking_threads_and_dtypes(method, params):
    base, fts = _models()
    base = {k: v.bfloat16() if v.is_floating_point() else v for k, v in base.items()}
    fts = [{k: v.bfloat16() if v.is_floating_point() else v for k, v in ft.items()} for ft in fts]
    before = [{k: v.clone() for k, v in sd.items()} for sd in (base, *fts)]
    merged = pyfuse.merge(method, base, fts, **params)
    assert all(torch.equal(sd[k], copy[k]) for sd, copy in zip((base, *fts), before) for k in sd)
    assert merged["emb"].dtype == torch.bfloat16 and merged["ids"].dtype == torch.int64
    wide = pyfuse.merge(method, base, fts, dtype="float32", **params)
    assert torch.equal(wide["emb"].bfloat16(), merged["emb"])
    small = plan_merge(method, base, fts, dtype="float32", threads=2, chunk_elements=5, **params).state_dict()
    assert all(torch.equal(small[k], wide[k]) for k in wide)


@pytest.mark.parametrize("method,params,message", [
    ("breadcrumbs", {"density": 1.5}, r"breadcrumbs: density must be in \[0, 1\], got 1.5"),
    ("breadcrumbs", {"gamma": -0.1}, r"breadcrumbs: gamma must be in \[0, 1\]"),
    ("breadcrumbs", {"consensus": "yes"}, "breadcrumbs: consensus must be true or false"),
    ("breadcrumbs", {"lambda": "x"}, "breadcrumbs: lambda must be a finite number"),
    ("breadcrumbs", {"weight": [1, 2]}, "breadcrumbs: unknown parameter 'weight'"),
    ("della", {"density": 0.1}, r"della: epsilon 0.15 puts density -/\+ epsilon outside \(0, 1\)"),
    ("della", {"density": 0.9, "epsilon": 0.1}, "della: epsilon 0.1 puts"),
    ("della", {"seed": -1}, "della: seed must be an integer"),
    ("della", {"normalize": 1}, "della: normalize must be true or false"),
    ("magmax", {"scaling": float("inf")}, "magmax: scaling must be a finite number"),
    ("magmax", {"scaling_factor": 0.5}, "magmax: unknown parameter 'scaling_factor'; accepted: scaling"),
])
def test_bad_parameters_are_named(method, params, message):
    with pytest.raises(ValueError, match=message):
        create_method(method, **params)


def test_weights_per_model_checked_before_work():
    base, fts = _models(2)
    for method in ("breadcrumbs", "della"):
        with pytest.raises(ValueError, match=f"{method}: weights has 3 entries, expected one per fine-tuned"):
            plan_merge(method, base, fts, weights=[1, 2, 3])
    # density outside (0, 1) needs no epsilon check: mergekit returns early there
    create_method("della", density=1.0, epsilon=0.9)
    create_method("della", density=0.0, epsilon=0.9)


def test_della_from_a_merge_config(tmp_path, capsys):
    base, fts = _models(2, seed=12)
    save_file(base, tmp_path / "base.safetensors")
    for i, ft in enumerate(fts):
        save_file(ft, tmp_path / f"ft{i}.safetensors")
    config = {"method": "della", "base": "base.safetensors",
              "models": [{"path": "ft0.safetensors", "weight": 0.5}, "ft1.safetensors"],
              "parameters": {"density": 0.5, "epsilon": 0.1, "lambda": 0.9, "seed": 5}}
    (tmp_path / "della.yaml").write_text(yaml.safe_dump(config))
    assert main(["merge", str(tmp_path / "della.yaml"), str(tmp_path / "out"), "--no-progress"]) == 0
    _close(load_dir(tmp_path / "out"), ref_della(base, fts, 0.5, 0.1, 0.9, seed=5, weights=[0.5, 1.0]))
