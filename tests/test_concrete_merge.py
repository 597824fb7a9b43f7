"""The fused Concrete merge: every backend against the float64 oracle (docs/concrete-merge.md), against each
other, and its gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pyfuse.ops import concrete_merge, sample_concrete_mask

from . import oracle

BACKENDS = ["reference", "cpp", "triton"]
MODES = ["relaxed", "hard", "threshold", "none"]
# Segment sizes 1 and sizes that are not multiples of any block or tile size.
SEGMENTS = [1, 37, 1, 64, 65, 130, 1, 255, 3]


def make_problem(segments=SEGMENTS, n=3, tv_dtype=torch.float32, layerwise=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    D = sum(segments)
    offsets = torch.tensor(np.concatenate([[0], np.cumsum(segments)]), dtype=torch.int64)
    base = torch.randn(D, generator=gen)
    tv = (torch.randn(n, D, generator=gen) * 0.1).to(tv_dtype)
    logits = torch.randn(D, generator=gen) * 2
    weights = torch.rand((n, len(segments)) if layerwise else (n,), generator=gen) + 0.1
    return base, tv, logits, weights, offsets


def run_op(problem, backend, grad=None, **kw):
    base, tv, logits, weights, offsets = problem
    x = logits.clone().requires_grad_()
    w = weights.clone().requires_grad_()
    out = concrete_merge(base, tv, x, w, offsets, backend=backend, **kw)
    if grad is None:
        return out.detach(), None, None
    out.backward(grad)
    return out.detach(), w.grad, x.grad


def oracle_of(problem, g, **kw):
    base, tv, logits, weights, offsets = problem
    kw = {"step": 0, "temperature": 0.5, "mask": "relaxed", "rescale": True, **kw}
    kw["mode"] = kw.pop("mask")
    return oracle.merge_and_grads(
        base.double().numpy(), tv.double().numpy(), logits.double().numpy(), weights.double().numpy(),
        offsets.tolist(), g.double().numpy(), **kw,
    )


def near_boundary(problem, seed, step, temperature):
    """Elements whose hard mask flips with an ulp of the logistic noise (allowed to differ)."""
    _, _, logits, _, _ = problem
    u = np.array([oracle.uniform(seed, step, j) for j in range(len(logits))])
    return np.abs(np.log(u) - np.log1p(-u) + logits.double().numpy()) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mask", MODES)
@pytest.mark.parametrize("rescale", [True, False])
@pytest.mark.parametrize("layerwise", [True, False])
def test_matches_float64_spec(backend, mask, rescale, layerwise):
    problem = make_problem(layerwise=layerwise)
    seed, step = 2**40 + 7, 3
    g = torch.randn(problem[0].numel(), generator=torch.Generator().manual_seed(1))
    out, gw, gx = run_op(problem, backend, g, seed=seed, step=step, mask=mask, rescale=rescale)
    ref_out, ref_gw, ref_gx = oracle_of(problem, g, seed=seed, step=step, mask=mask, rescale=rescale)
    if not layerwise:
        ref_gw = ref_gw.sum(1)
    assert not near_boundary(problem, seed, step, 0.5).any(), "pick a seed without coin-flip elements"
    np.testing.assert_allclose(out.double().numpy(), ref_out, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(gw.double().numpy(), ref_gw, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(gx.double().numpy(), ref_gx, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("tv_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mask", ["relaxed", "hard"])
def test_backends_agree_with_reference(backend, tv_dtype, mask):
    segments = [1, 1, 700, 1023, 1, 2049, 5] if backend == "triton" else [1, 1, 7000, 40961, 1, 65537, 5]
    problem = make_problem(segments, n=4, tv_dtype=tv_dtype, seed=5)
    kw = {"seed": 2**63 + 11, "step": 2**31 + 5, "temperature": 0.3, "mask": mask}
    g = torch.randn(problem[0].numel(), generator=torch.Generator().manual_seed(2))
    out, gw, gx = run_op(problem, backend, g, **kw)
    ref_out, ref_gw, ref_gx = run_op(problem, "reference", g, **kw)
    # Uniform noise is bit-identical; logs may differ by an ulp, so hard masks can flip only at the boundary.
    m = sample_concrete_mask(problem[2], backend=backend, **kw)
    ref_m = sample_concrete_mask(problem[2], backend="reference", **kw)
    flips = (m != ref_m).sum().item() if mask == "hard" else 0
    assert flips <= 1
    if flips == 0:
        torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gw, ref_gw, rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(gx, ref_gx, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(m, ref_m, rtol=0, atol=2e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mask", MODES)
def test_sample_mask_is_the_mask_the_merge_used(backend, mask):
    D = 300
    logits = torch.randn(D, generator=torch.Generator().manual_seed(3))
    ones = torch.ones(1, D)
    offsets = torch.tensor([0, 100, D])
    kw = {"seed": 9, "step": 4, "temperature": 0.7, "mask": mask, "backend": backend}
    merged = concrete_merge(torch.zeros(D), ones, logits, torch.ones(1), offsets, rescale=False, **kw)
    m = sample_concrete_mask(logits, **kw)
    assert torch.equal(merged, m)
    ref = oracle.mask(logits.double().numpy(), 9, 4, 0.7, mask)
    np.testing.assert_allclose(m.double().numpy(), ref, atol=2e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mask", MODES)
def test_sample_mask_of_a_chunk_is_drawn_at_its_global_indices(backend, mask):
    # the static `concrete` method draws a streamed model's mask chunk by chunk with `start`
    D = 300
    logits = torch.randn(D, generator=torch.Generator().manual_seed(3))
    kw = {"seed": 9, "step": 4, "temperature": 0.7, "mask": mask, "backend": backend}
    splits = [[D], [1, 99, 200], [37, 263]]
    pieces = [torch.cat([sample_concrete_mask(chunk, start=int(lo), **kw)
                         for lo, chunk in zip(np.cumsum([0, *sizes[:-1]]), torch.split(logits, sizes))])
              for sizes in splits]
    ref = oracle.mask(logits.double().numpy(), 9, 4, 0.7, mask)
    for piece in pieces:  # the noise of element j whatever the split: the whole-model mask, to rounding
        np.testing.assert_allclose(piece.double().numpy(), ref, atol=2e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mask", ["relaxed", "hard"])
@pytest.mark.parametrize("first, last", [(0, 4), (2, 7), (5, 9)])
def test_a_shard_merged_with_start_is_that_slice_of_the_whole_merge(backend, mask, first, last):
    # the distributed loop merges each rank's segments [first, last) with start = their first flat index
    problem = make_problem()
    base, tv, logits, weights, offsets = problem
    lo, hi = int(offsets[first]), int(offsets[last])
    shard = (base[lo:hi], tv[:, lo:hi], logits[lo:hi], weights[:, first:last], offsets[first:last + 1] - lo)
    kw = {"seed": 2**40 + 7, "step": 3, "temperature": 0.5, "mask": mask}
    g = torch.randn(base.numel(), generator=torch.Generator().manual_seed(1))
    out, gw, gx = run_op(problem, backend, g, **kw)
    shard_out, shard_gw, shard_gx = run_op(shard, backend, g[lo:hi], start=lo, **kw)
    torch.testing.assert_close(shard_out, out[lo:hi], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(shard_gw, gw[:, first:last], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(shard_gx, gx[lo:hi], rtol=1e-5, atol=1e-7)
    # the mask the shard's merge applied is the one `sample_concrete_mask` draws at the same global indices
    ones = torch.ones(1, hi - lo)
    applied = concrete_merge(torch.zeros(hi - lo), ones, logits[lo:hi], torch.ones(1), shard[4], rescale=False,
                             start=lo, backend=backend, **kw)
    sampled = sample_concrete_mask(logits[lo:hi], start=lo, backend=backend, **kw)
    torch.testing.assert_close(applied, sampled, rtol=0, atol=2e-6)
    ref = oracle.mask(logits.double().numpy(), kw["seed"], 3, 0.5, mask)[lo:hi]
    np.testing.assert_allclose(applied.double().numpy(), ref, atol=2e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_shard_past_2_to_the_32_draws_the_noise_of_its_global_indices(backend):
    # a shard of a model above 2^32 elements: its indices cross into the counter's high word
    D, start, seed, step, temperature = 300, 2**32 - 100, 9, 4, 0.7
    logits = torch.randn(D, generator=torch.Generator().manual_seed(3))
    applied = concrete_merge(torch.zeros(D), torch.ones(1, D), logits, torch.ones(1), torch.tensor([0, 37, D]),
                             seed=seed, step=step, start=start, temperature=temperature, rescale=False,
                             backend=backend)
    u = np.array([oracle.uniform(seed, step, start + k) for k in range(D)], dtype=np.float64)
    noisy = np.log(u) - np.log1p(-u) + logits.double().numpy()
    np.testing.assert_allclose(applied.double().numpy(), 1 / (1 + np.exp(-noisy / temperature)), atol=2e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_seed_same_result_and_step_changes_it(backend):
    problem = make_problem()
    a = run_op(problem, backend, seed=1, step=0)[0]
    b = run_op(problem, backend, seed=1, step=0)[0]
    c = run_op(problem, backend, seed=1, step=1)[0]
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_gradcheck_reference_float64():
    problem = make_problem([1, 9, 4, 6], n=2)
    base, tv, logits, weights, offsets = (t.double() if t.is_floating_point() else t for t in problem)
    for rescale in (True, False):
        for w in (weights, weights[:, 0].contiguous()):
            def f(x, w, rescale=rescale):
                return concrete_merge(base, tv, x, w, offsets, seed=5, step=2, rescale=rescale, backend="reference")

            assert torch.autograd.gradcheck(f, (logits.clone().requires_grad_(), w.clone().requires_grad_()))


def autograd_formula(problem, seed, step, temperature):
    """The merge of docs/concrete-merge.md written with differentiable torch ops, so autograd derives its gradients."""
    base, tv, logits, weights, offsets = problem
    from pyfuse.ops.philox import concrete_uniform

    x = logits.double().clone().requires_grad_()
    w = weights.double().clone().requires_grad_()
    u = concrete_uniform(seed, step, 0, x.numel()).double()
    m = torch.sigmoid((torch.log(u) - torch.log1p(-u) + x) / temperature)
    pieces = []
    for s in range(offsets.numel() - 1):
        lo, hi = int(offsets[s]), int(offsets[s + 1])
        r = m[lo:hi] / m[lo:hi].mean()
        pieces.append(base[lo:hi].double() + r * (w[:, s : s + 1] * tv[:, lo:hi].double()).sum(0))
    return torch.cat(pieces), x, w


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_backward_matches_autograd_through_the_formula(backend):
    problem = make_problem(n=2)
    g = torch.randn(problem[0].numel(), generator=torch.Generator().manual_seed(4))
    out, gw, gx = run_op(problem, backend, g, seed=77, step=6, temperature=0.5)
    ref_out, x, w = autograd_formula(problem, 77, 6, 0.5)
    ref_out.backward(g.double())
    torch.testing.assert_close(out.double(), ref_out.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw.double(), w.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gx.double(), x.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("logit", [-2.0, 0.0, 1.5])
@pytest.mark.parametrize("temperature", [0.2, 0.5, 1.0])
def test_relaxed_mask_has_the_relaxed_bernoulli_law(backend, logit, temperature):
    from scipy.stats import ks_2samp

    N = 20000
    logits = torch.full((N,), logit)
    m = sample_concrete_mask(logits, seed=1234, step=0, temperature=temperature, backend=backend)
    gen = torch.Generator().manual_seed(99)
    with torch.random.fork_rng():
        torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
        dist = torch.distributions.RelaxedBernoulli(torch.tensor(temperature), logits=torch.tensor(logit))
        samples = dist.sample((N,))
    # torch clamps its samples to [tiny, 1 - eps]; fp32 sigmoid saturates to exactly 0 or 1 instead.
    fin = torch.finfo(torch.float32)
    m = m.clamp(fin.tiny, 1 - fin.eps).numpy()
    assert ks_2samp(m, samples.numpy()).pvalue > 1e-3
    # The test has power: a different temperature is rejected.
    wrong = torch.distributions.RelaxedBernoulli(torch.tensor(temperature * 2), logits=torch.tensor(logit))
    assert ks_2samp(m, wrong.sample((N,)).numpy()).pvalue < 1e-3


def test_hard_mask_is_bernoulli_of_sigmoid():
    N = 40000
    for logit in (-1.0, 0.0, 2.0):
        m = sample_concrete_mask(torch.full((N,), logit), seed=3, mask="hard", backend="reference")
        p = torch.sigmoid(torch.tensor(logit)).item()
        assert abs(m.mean().item() - p) < 4 * (p * (1 - p) / N) ** 0.5


def test_all_zero_segment_stays_at_base():
    base, tv, _, weights, offsets = make_problem([5, 7], n=2)
    logits = torch.cat([torch.full((5,), -1.0), torch.full((7,), 1.0)])
    out = concrete_merge(base, tv, logits, weights, offsets, seed=0, mask="threshold", backend="reference")
    assert torch.equal(out[:5], base[:5])
    expected = base[5:] + (weights[:, 1:2] * tv[:, 5:]).sum(0)
    torch.testing.assert_close(out[5:], expected)


def test_torch_compile_sees_one_op():
    problem = make_problem(n=2)
    base, tv, logits, weights, offsets = problem

    def f(x, w):
        return concrete_merge(base, tv, x, w, offsets, seed=1, step=2, backend="reference").square().sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    x, w = logits.clone().requires_grad_(), weights.clone().requires_grad_()
    compiled(x, w).backward()
    x2, w2 = logits.clone().requires_grad_(), weights.clone().requires_grad_()
    f(x2, w2).backward()
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(w.grad, w2.grad)


# ------------------------------------------------------------------ bad inputs
def _call(**override):
    base, tv, logits, weights, offsets = make_problem([3, 4], n=2)
    args = {"base": base, "task_vectors": tv, "logits": logits, "weights": weights, "offsets": offsets}
    kw = {"seed": 0, "backend": "reference"}
    for k, v in override.items():
        (args if k in args else kw)[k] = v
    return concrete_merge(*args.values(), **kw)


@pytest.mark.parametrize(
    "override, message",
    [
        ({"base": torch.zeros(6)}, "base must be"),
        ({"task_vectors": torch.zeros(2, 6)}, "task_vectors must be"),
        ({"weights": torch.zeros(3)}, "weights must be"),
        ({"weights": torch.zeros(2, 3)}, "weights must be"),
        ({"offsets": torch.tensor([0, 3, 6])}, "offsets must run from 0 to D=7"),
        ({"offsets": torch.tensor([0, 3, 3, 7])}, "strictly increasing; segment 1"),
        ({"offsets": torch.tensor([0.0, 7.0])}, "offsets must be int64"),
        ({"logits": torch.tensor([0.0, 1, float("nan"), 0, 0, 0, 0])}, r"logits\[2\] = nan"),
        ({"logits": torch.tensor([0.0, 1, 0, 0, 0, float("inf"), 0])}, r"logits\[5\] = inf"),
        ({"logits": torch.zeros(7, dtype=torch.float16)}, "logits must be"),
        ({"task_vectors": torch.zeros(2, 7, dtype=torch.int32)}, "task_vectors must be a floating"),
        ({"logits": torch.zeros(7, device="meta")}, "all tensors must be on one device"),
        ({"seed": -1}, "seed must be"),
        ({"seed": 2**64}, "seed must be"),
        ({"step": 2**32}, "step must be"),
        ({"temperature": 0.0}, "temperature must be"),
        ({"mask": "soft"}, "mask must be one of"),
        ({"backend": "cuda"}, "unknown backend"),
    ],
)
def test_bad_inputs_raise_clear_errors(override, message):
    with pytest.raises((ValueError, TypeError), match=message):
        _call(**override)


def test_cpp_backend_refuses_non_cpu_tensors():
    from pyfuse.ops.backends import BackendUnavailable

    with pytest.raises(BackendUnavailable, match="does not run on meta"):
        concrete_merge(*(t.to("meta") for t in make_problem([3, 4], n=2)), seed=0, backend="cpp")


def test_auto_falls_back_to_reference_with_one_warning(monkeypatch):
    import warnings

    from pyfuse.ops import backends

    def no_compiler():
        raise backends.BackendUnavailable("the C++ backend could not be built: no compiler")

    monkeypatch.setitem(backends.BACKENDS, "cpp", backends.Backend("cpp", ("cpu",), no_compiler))
    monkeypatch.setattr(backends, "_loaded", {})
    monkeypatch.setattr(backends, "_warned", set())
    problem = make_problem()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = run_op(problem, "auto", seed=4)[0]
        run_op(problem, "auto", seed=4)
    assert [str(w.message) for w in caught] == [
        "pyfuse: the C++ backend could not be built: no compiler; falling back to the next backend"
    ]
    assert torch.equal(first, run_op(problem, "reference", seed=4)[0])
