"""Each static method against a closed-form re-derivation on small random state dicts, and the registry."""

import pytest
import torch

import pyfuse
from pyfuse.merge import plan_merge
from pyfuse.methods import REQUIRED, Param, StaticMethod, create_method, get_method, number, register
from pyfuse.ops import concrete_merge
from pyfuse.ops.philox import concrete_uniform
from pyfuse.ops.reference import MODES, concrete_mask
from pyfuse.taskvectors import TaskVectors

from .oracle import ties_select

SHAPES = {"b1": (11,), "emb": (13, 7), "norm": (5,), "w1": (7, 11)}  # sorted: the engine's flat order


def _models(n=3, seed=0, scale=0.1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(s, generator=g).to(dtype) for k, s in SHAPES.items()}
    base = {k: base[k] for k in ("w1", "emb", "norm", "b1")}  # given out of order, as modules often are
    base["ids"] = torch.arange(6)  # an integer buffer: carried, not merged
    fts = []
    for _ in range(n):
        ft = {k: (v.float() + scale * torch.randn(v.shape, generator=g)).to(dtype) for k, v in base.items()}
        ft["ids"] = base["ids"].clone()
        fts.append(ft)
    return base, fts


def _flat(sd, shapes=SHAPES):
    return torch.cat([sd[k].float().reshape(-1) for k in shapes])


def _unflat(flat, shapes=SHAPES):
    out, lo = {}, 0
    for k, s in shapes.items():
        n = torch.Size(s).numel()
        out[k] = flat[lo: lo + n].view(s)
        lo += n
    return out


def _close(merged, expected, **tol):
    for k in expected:
        torch.testing.assert_close(merged[k], expected[k].to(merged[k].dtype), **tol)


# ---------------------------------------------------------------------------------------------
# TIES, re-derived on the flattened model (the selection: tests/oracle.py, shared with AdaMerging++)
# ---------------------------------------------------------------------------------------------
def ref_ties(base, fts, density=0.2, scaling=0.3, merge_func="sum", trim="global", weights=None):
    shapes = {k: v.shape for k, v in base.items() if v.is_floating_point()}
    b = _flat(base, shapes)
    tau = torch.stack([_flat(ft, shapes) - b for ft in fts])
    w = torch.ones(len(fts)) if weights is None else torch.tensor(weights)
    bounds = torch.tensor([0, *[s.numel() for s in shapes.values()]]).cumsum(0).tolist()
    selected, agree, s = ties_select(tau, density, trim, w, list(zip(bounds[:-1], bounds[1:])))
    if merge_func == "sum":
        merged = selected.sum(0)
    elif merge_func == "mean":
        divisor = (agree * w[:, None]).sum(0)
        merged = selected.sum(0) / torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    else:
        merged = selected.abs().amax(0) * s
    return _unflat(b + scaling * merged, shapes)


@pytest.mark.parametrize("trim", ["global", "tensor"])
@pytest.mark.parametrize("merge_func", ["sum", "mean", "max"])
@pytest.mark.parametrize("n", [2, 3])
def test_ties_matches_the_reference(trim, merge_func, n):
    base, fts = _models(n)
    for density in (0.2, 0.5, 1.0):
        merged = pyfuse.merge("ties", base, fts, density=density, merge_func=merge_func, trim=trim)
        _close(merged, ref_ties(base, fts, density, 0.3, merge_func, trim), rtol=1e-6, atol=1e-6)


def test_ties_weights_and_defaults():
    base, fts = _models(3, seed=4)
    merged = pyfuse.merge("ties", base, fts, density=0.5, weights=[0.5, 2.0, -1.0], scaling=1.0, merge_func="mean")
    _close(merged, ref_ties(base, fts, 0.5, 1.0, "mean", "global", [0.5, 2.0, -1.0]), rtol=1e-6, atol=1e-6)
    method = create_method("ties")
    assert method.config == {"density": 0.2, "scaling": 0.3, "merge_func": "sum", "trim": "global", "weights": None}
    assert create_method("ties", trim="tensor").config["merge_func"] == "mean"  # mergekit's normalisation


def test_ties_off_by_one_of_the_kth_value():
    # magnitudes 1..10 in one tensor; density 0.3: k = 10 - floor(3.0000000000000004) = 7, t = 7, so 4 survive
    base = {"w": torch.zeros(10)}
    values = torch.tensor([3.0, -7.0, 1.0, 10.0, -2.0, 8.0, 5.0, -9.0, 4.0, 6.0])
    merged = pyfuse.merge("ties", base, [{"w": values}], density=0.3, scaling=1.0)
    kept = merged["w"] != 0
    assert kept.sum() == 4
    assert torch.equal(merged["w"][kept], values[values.abs() >= 7])
    # mergekit's per-tensor rule keeps exactly floor(10 * 0.3) = 3
    merged = pyfuse.merge("ties", base, [{"w": values}], density=0.3, scaling=1.0, trim="tensor")
    assert torch.equal(merged["w"], torch.where(values.abs() >= 8, values, 0.0))


def test_ties_keeps_every_tie_at_the_threshold():
    base = {"w": torch.zeros(8)}
    values = torch.tensor([0.5, -0.5, 0.5, 0.1, 0.5, 0.2, -0.3, 0.5])  # 5 entries of magnitude 0.5
    for trim in ("global", "tensor"):
        merged = pyfuse.merge("ties", base, [{"w": values}], density=0.25, scaling=1.0, trim=trim)
        assert torch.equal(merged["w"], torch.where(values.abs() >= 0.5, values, 0.0))


@pytest.mark.parametrize("majority", [1, -1, 0])
def test_ties_zero_sign_resolution(majority):
    # entries 0-1 cancel exactly; the elected signs of entries 2-5 set the model-wide majority
    a = torch.tensor([0.5, -0.25, 1.0, 1.0, -1.0, -1.0])
    b = torch.tensor([-0.5, 0.25, 1.0, 1.0, -1.0, -1.0])
    if majority:
        a[2:], b[2:] = majority * 1.0, majority * 1.0
    base = {"w": torch.zeros(6)}
    cancelled = {1: [0.5, 0.25], -1: [-0.5, -0.25], 0: [-0.5, -0.25]}[majority]  # s = 0 keeps negatives
    for merge_func in ("sum", "mean", "max"):
        merged = pyfuse.merge("ties", base, [{"w": a}, {"w": b}], density=1.0, scaling=1.0, merge_func=merge_func)
        _close(merged, ref_ties(base, [{"w": a}, {"w": b}], 1.0, 1.0, merge_func), rtol=0, atol=0)
        expected = [0.0, 0.0] if merge_func == "max" and majority == 0 else cancelled  # max * s, s = 0
        assert merged["w"][:2].tolist() == expected, merge_func
    # mergekit's variant takes a zero sum as positive
    merged = pyfuse.merge("ties", base, [{"w": a}, {"w": b}], density=1.0, scaling=1.0, trim="tensor",
                          merge_func="sum")
    assert torch.equal(merged["w"][:2], torch.tensor([0.5, 0.25]))


# ---------------------------------------------------------------------------------------------
# Linear, DARE, Concrete
# ---------------------------------------------------------------------------------------------
def test_average_and_task_arithmetic():
    base, fts = _models(3)
    merged = pyfuse.merge("average", base, fts)
    _close(merged, _unflat(torch.stack([_flat(ft) for ft in fts]).mean(0)), rtol=1e-6, atol=1e-6)
    merged = pyfuse.merge("average", base, fts, weights=[1.0, 3.0, 0.0])
    _close(merged, _unflat((_flat(fts[0]) + 3 * _flat(fts[1])) / 4), rtol=1e-6, atol=1e-6)
    merged = pyfuse.merge("task_arithmetic", base, fts)
    b = _flat(base)
    _close(merged, _unflat(b + 0.3 * sum(_flat(ft) - b for ft in fts)), rtol=1e-6, atol=1e-6)
    merged = pyfuse.merge("task_arithmetic", base, fts, scaling=0.7, weights=[1.0, -1.0, 2.0])
    taus = [_flat(ft) - b for ft in fts]
    _close(merged, _unflat(b + 0.7 * (taus[0] - taus[1] + 2 * taus[2])), rtol=1e-6, atol=1e-6)
    assert torch.equal(merged["ids"], base["ids"])


def _dropped(base, fts, p, seed):
    b = _flat(base)
    out = []
    for i, ft in enumerate(fts):
        tau = _flat(ft) - b
        u = concrete_uniform(seed, i, 0, tau.numel())
        out.append(_unflat(b + torch.where(u >= p, tau / (1 - p), 0.0)))
    return out


def test_dare_then_task_arithmetic_and_ties():
    base, fts = _models(2, seed=3)
    merged = pyfuse.merge("dare", base, fts, p=0.4, seed=7, scaling=0.5)
    b = _flat(base)
    dropped = _dropped(base, fts, 0.4, 7)
    _close(merged, _unflat(b + 0.5 * sum(_flat(d) - b for d in dropped)), rtol=1e-6, atol=1e-6)
    merged = pyfuse.merge("dare", base, fts, p=0.4, seed=7, then="ties", density=0.5, merge_func="mean")
    _close(merged, ref_ties(base, dropped, 0.5, 0.3, "mean", "global"), rtol=1e-6, atol=1e-6)
    # p = 0 is plain task arithmetic; the drop rate is what it says
    _close(pyfuse.merge("dare", base, fts, p=0.0), pyfuse.merge("task_arithmetic", base, fts), rtol=0, atol=0)
    u = concrete_uniform(7, 0, 0, 40_000)
    assert abs(float((u < 0.4).float().mean()) - 0.4) < 0.015  # 6 standard deviations


@pytest.mark.parametrize("mode", MODES)
def test_concrete_matches_the_fused_op_on_the_flat_model(mode):
    base, fts = _models(2, seed=5)
    D = _flat(base).numel()
    logits = torch.randn(D, generator=torch.Generator().manual_seed(9))
    params = dict(mask=mode, seed=11, step=3, temperature=0.5, scaling=0.3)
    merged = pyfuse.merge("concrete", base, fts, logits=logits, **params)
    # the same logits, per parameter, give the same result
    per_name = pyfuse.merge("concrete", base, fts, logits=_unflat(logits), **params)
    _close(per_name, {k: v.float() for k, v in merged.items() if k in SHAPES}, rtol=0, atol=0)
    # closed form: r = m / mean(m) per tensor, m drawn at the global flat index
    m = concrete_mask(logits, 11, 3, 0.5, MODES.index(mode))
    r = torch.cat([seg / seg.mean() if seg.sum() > 0 else torch.zeros_like(seg)
                   for seg in torch.split(m, [torch.Size(s).numel() for s in SHAPES.values()])])
    b = _flat(base)
    _close(merged, _unflat(b + r * 0.3 * sum(_flat(ft) - b for ft in fts)), rtol=1e-5, atol=1e-6)
    # and the whole-model fused op agrees, on the same (name-sorted) flat layout
    tv = TaskVectors.from_models(dict(sorted(base.items())), [dict(sorted(ft.items())) for ft in fts])
    flat = concrete_merge(tv.base, tv.vectors, logits, torch.full((2,), 0.3), tv.layout.offsets, seed=11, step=3,
                          temperature=0.5, mask=mode)
    _close(merged, {k: v for k, v in tv.state_dict(flat).items() if k in SHAPES}, rtol=1e-5, atol=1e-6)


def test_concrete_errors():
    base, fts = _models(2)
    with pytest.raises(ValueError, match="'logits' is required"):
        pyfuse.merge("concrete", base, fts)
    with pytest.raises(ValueError, match="expected D = "):
        pyfuse.merge("concrete", base, fts, logits=torch.zeros(5))
    bad = {k: torch.zeros(s) for k, s in SHAPES.items()}
    bad["w1"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"mask logits: tensor 'w1' has shape \[3\]"):
        pyfuse.merge("concrete", base, fts, logits=bad)
    assert pyfuse.merge("concrete", base, fts, mask="none")["b1"].shape == (11,)


# ---------------------------------------------------------------------------------------------
# The engine's contract, on every method
# ---------------------------------------------------------------------------------------------
ALL = [("average", {}), ("task_arithmetic", {}), ("ties", {}), ("ties", {"trim": "tensor"}),
       ("dare", {"then": "ties"}), ("concrete", {"mask": "hard", "logits": torch.randn(184)})]


@pytest.mark.parametrize("method,params", ALL, ids=[m + "-" + "-".join(p) for m, p in ALL])
def test_inputs_untouched_chunking_threads_and_dtypes(method, params):
    base, fts = _models(3, dtype=torch.bfloat16)
    before = [{k: v.clone() for k, v in sd.items()} for sd in (base, *fts)]
    merged = pyfuse.merge(method, base, fts, **params)
    for sd, copy in zip((base, *fts), before):
        assert all(torch.equal(sd[k], copy[k]) for k in sd)
    assert merged["emb"].dtype == torch.bfloat16 and merged["ids"].dtype == torch.int64
    # the arithmetic is fp32: asking for fp32 output gives the unrounded values
    wide = pyfuse.merge(method, base, fts, dtype="float32", **params)
    assert wide["emb"].dtype == torch.float32 and torch.equal(wide["emb"].bfloat16(), merged["emb"])
    # chunking and threading change nothing, bit for bit
    small = plan_merge(method, base, fts, dtype="float32", threads=1, chunk_elements=5, **params).state_dict()
    assert all(torch.equal(small[k], wide[k]) for k in wide)


def test_bad_inputs_name_the_model_and_key():
    base, fts = _models(2)
    missing = dict(fts[1])
    del missing["w1"]
    with pytest.raises(KeyError, match="fine-tuned model 2: missing tensor 'w1'"):
        pyfuse.merge("ties", base, [fts[0], missing])
    shaped = dict(fts[0], b1=torch.zeros(12))
    with pytest.raises(ValueError, match=r"fine-tuned model 1: tensor 'b1' has shape \[12\], expected \[11\]"):
        pyfuse.merge("ties", base, [shaped, fts[1]])
    integer = dict(fts[0], norm=torch.zeros(5, dtype=torch.int32))
    with pytest.raises(TypeError, match="fine-tuned model 1: tensor 'norm' is torch.int32"):
        pyfuse.merge("average", base, [integer])
    extra = dict(fts[0], head=torch.zeros(3))
    with pytest.raises(KeyError, match="fine-tuned model 1: tensor 'head' is not in the base model"):
        pyfuse.merge("average", base, [extra])
    with pytest.raises(ValueError, match="non-empty list"):
        pyfuse.merge("average", base, [])
    with pytest.raises(ValueError, match="weights has 3 entries, expected one per fine-tuned model \\(2\\)"):
        pyfuse.merge("task_arithmetic", base, fts, weights=[1, 2, 3])


@pytest.mark.parametrize("density", [0, -0.1, 1.5, float("nan"), "0.5", True])
def test_density_outside_the_unit_interval(density):
    with pytest.raises(ValueError, match="ties: density"):
        create_method("ties", density=density)


def test_registry():
    with pytest.raises(ValueError, match="unknown merge method 'tie'; available: average, breadcrumbs, concrete, dare"):
        get_method("tie")
    with pytest.raises(ValueError, match="ties: unknown parameter 'densty'; accepted: density, scaling"):
        create_method("ties", densty=0.5)
    with pytest.raises(ValueError, match="ties: merge_func must be one of 'sum', 'mean', 'max', got 'median'"):
        create_method("ties", merge_func="median")
    with pytest.raises(ValueError, match=r"dare \(then=ties\): ties: unknown parameter 'q'"):
        create_method("dare", then="ties", q=1)
    with pytest.raises(ValueError, match="already registered"):
        register(type("Other", (StaticMethod,), {"name": "ties"}))

    @register
    class Midpoint(StaticMethod):  # a method registered from outside the package
        name = "test_midpoint"
        params = {"where": Param(REQUIRED, number(0, 1), "how far towards the first model")}

        def merge_chunk(self, chunk, plan):
            return chunk.base + self.config["where"] * chunk.deltas[0]

    base, fts = _models(1)
    with pytest.raises(ValueError, match="test_midpoint: parameter 'where' is required"):
        pyfuse.merge("test_midpoint", base, fts)
    with pytest.raises(ValueError, match=r"test_midpoint: where must be in \[0, 1\], got 2"):
        pyfuse.merge("test_midpoint", base, fts, where=2)
    merged = pyfuse.merge("test_midpoint", base, fts, where=0.25)
    _close(merged, _unflat(_flat(base) + 0.25 * (_flat(fts[0]) - _flat(base))), rtol=1e-6, atol=1e-6)
