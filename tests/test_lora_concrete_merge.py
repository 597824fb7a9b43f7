"""The factored merge `lora_concrete_merge`: against the float64 oracle on the densified task vectors, against
the dense op on every backend (forward, both gradients, every mask mode), gradcheck, and the noise contract."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pyfuse.ops import LoraFactors, concrete_merge, lora_concrete_merge, sample_concrete_mask

from . import oracle

BACKENDS = ["reference", "cpp", "triton"]
MODES = ["relaxed", "hard", "threshold", "none"]
# (rows, cols) per segment, and per task the rank it gives each segment (0: it does not target it). Mixed
# ranks, segments only some tasks target, one no task targets, 1-row and 1-column tensors, odd sizes.
SMALL = {
    "shapes": [(6, 5), (1, 9), (7, 4), (3, 1), (13, 11), (5, 64)],
    "ranks": [[2, 0, 1, 3, 0, 4], [1, 0, 0, 2, 5, 1], [3, 0, 2, 0, 1, 2]],
}


def make_factored(shapes, ranks, *, dtype=torch.float32, seed=0, rslora=False):
    """Random factors: task i gives segment s a rank-ranks[i][s] delta with its own LoRA scale."""
    gen = torch.Generator().manual_seed(seed)
    n = len(ranks)
    sizes = [r * c for r, c in shapes]
    offsets = torch.tensor(np.concatenate([[0], np.cumsum(sizes)]), dtype=torch.int64)
    terms = []
    for s, (rows, cols) in enumerate(shapes):
        seg = []
        for task in range(n):
            r = ranks[task][s]
            if r:
                alpha = 2.0 * (task + 1)
                scale = alpha / r**0.5 if rslora else alpha / r
                seg.append((task, torch.randn(rows, r, generator=gen) * 0.3, torch.randn(r, cols, generator=gen) * 0.3,
                            scale))
        terms.append(seg)
    factors = LoraFactors.from_segments(offsets, [r for r, _ in shapes], terms, n, dtype)
    D = sum(sizes)
    base = torch.randn(D, generator=gen)
    logits = torch.randn(D, generator=gen) * 2
    weights = torch.rand(n, len(shapes), generator=gen) + 0.1
    return base, factors, logits, weights, offsets


def run(base, tv, logits, weights, offsets, g, **kw):
    x = logits.clone().requires_grad_()
    w = weights.clone().requires_grad_()
    out = concrete_merge(base, tv, x, w, offsets, **kw)
    out.backward(g)
    return out.detach(), x.grad, w.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mask", MODES)
@pytest.mark.parametrize("rescale", [True, False])
def test_matches_float64_spec_on_the_densified_vectors(backend, mask, rescale):
    base, factors, logits, weights, offsets = make_factored(**SMALL)
    g = torch.randn(base.numel(), generator=torch.Generator().manual_seed(1))
    seed, step = 2**40 + 7, 3
    out, gx, gw = run(base, factors, logits, weights, offsets, g, seed=seed, step=step, mask=mask, rescale=rescale,
                      backend=backend)
    # the oracle gets the task vectors densified independently, in float64, from the same factors
    dense = factors.to(dtype=torch.float64).densify(torch.float64)
    ref_out, ref_gw, ref_gx = oracle.merge_and_grads(
        base.double().numpy(), dense.numpy(), logits.double().numpy(), weights.double().numpy(), offsets.tolist(),
        g.double().numpy(), seed=seed, step=step, temperature=0.5, mode=mask, rescale=rescale,
    )
    np.testing.assert_allclose(out.double().numpy(), ref_out, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(gw.double().numpy(), ref_gw, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(gx.double().numpy(), ref_gx, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("taskwise", [False, True])
def test_factored_equals_dense_op_on_densified_vectors(backend, dtype, taskwise):
    # Larger tensors: several row tiles per segment (the C++ backend's tiles hold 262144 elements), rows that
    # are not multiples of the blocking, a row longer than a whole tile, and ranks summing past a power of two.
    if backend == "triton":
        shapes = [(40, 33), (3, 1100), (70, 17)]
    elif backend == "cpp":
        shapes = [(2700, 100), (2, 300000), (67, 129), (1, 3)]
    else:  # the reference's fp32 sums over these many elements drift past the tolerance from the dense order
        shapes = [(300, 100), (2, 20000), (67, 129), (1, 3)]
    ranks = [[4, 1, 16, 0], [8, 2, 0, 1], [16, 0, 5, 0]]
    ranks = [r[: len(shapes)] for r in ranks]
    base, factors, logits, weights, offsets = make_factored(shapes, ranks, dtype=dtype, seed=4, rslora=True)
    if taskwise:
        weights = weights[:, 0].contiguous()
    dense = factors.densify(torch.float32)
    g = torch.randn(base.numel(), generator=torch.Generator().manual_seed(2))
    kw = {"seed": 2**63 + 11, "step": 2**31 + 5, "temperature": 0.3, "backend": backend}
    out, gx, gw = run(base, factors, logits, weights, offsets, g, **kw)
    ref_out, ref_gx, ref_gw = run(base, dense, logits, weights, offsets, g, **kw)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw, ref_gw, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(gx, ref_gx, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_mask_is_the_dense_ops_mask(backend):
    # With a = 1 everywhere (rank one, all-ones factors), base 0 and no rescale, the output IS the mask: the
    # same Philox positions as the dense op and `sample_concrete_mask`, across row tiles and segments.
    shapes = [(9, 7), (130, 40)] if backend == "triton" else [(9, 7), (6000, 50)]
    offsets = torch.tensor([0, 63, 63 + shapes[1][0] * shapes[1][1]])
    terms = [[(0, torch.ones(r, 1), torch.ones(1, c), 1.0)] for r, c in shapes]
    factors = LoraFactors.from_segments(offsets, [r for r, _ in shapes], terms, 1)
    D = int(offsets[-1])
    logits = torch.randn(D, generator=torch.Generator().manual_seed(3))
    kw = {"seed": 9, "step": 4, "temperature": 0.7, "backend": backend}
    for mask in MODES:
        merged = lora_concrete_merge(torch.zeros(D), factors, logits, torch.ones(1), offsets, rescale=False, mask=mask,
                                     **kw)
        assert torch.equal(merged, sample_concrete_mask(logits, mask=mask, **kw)), mask


def test_gradcheck_reference_float64():
    base, factors, logits, weights, offsets = make_factored([(3, 4), (2, 5), (1, 3)], [[2, 0, 1], [1, 3, 0]])
    factors = factors.to(dtype=torch.float64)
    for rescale in (True, False):
        for w in (weights.double(), weights[:, 1].double().contiguous()):
            def f(x, w, rescale=rescale):
                return lora_concrete_merge(base.double(), factors, x, w, offsets, seed=5, step=2, rescale=rescale,
                                           backend="reference")

            assert torch.autograd.gradcheck(f, (logits.double().requires_grad_(), w.requires_grad_()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic_and_step_changes_the_mask(backend):
    problem = make_factored(**SMALL)
    a = concrete_merge(*problem, seed=1, step=0, backend=backend)
    assert torch.equal(a, concrete_merge(*problem, seed=1, step=0, backend=backend))
    assert not torch.allclose(a, concrete_merge(*problem, seed=1, step=1, backend=backend))


def test_untargeted_segment_stays_at_base():
    base, factors, logits, weights, offsets = make_factored(**SMALL)
    out = lora_concrete_merge(base, factors, logits, weights, offsets, seed=0, backend="reference")
    lo, hi = int(offsets[1]), int(offsets[2])  # segment 1: no task gives it a rank
    assert torch.equal(out[lo:hi], base[lo:hi])
    assert not torch.equal(out[: int(offsets[1])], base[: int(offsets[1])])


def test_torch_compile_sees_one_op():
    base, factors, logits, weights, offsets = make_factored(**SMALL)

    def f(x, w):
        return lora_concrete_merge(base, factors, x, w, offsets, seed=1, step=2, backend="reference").square().sum()

    x, w = logits.clone().requires_grad_(), weights.clone().requires_grad_()
    torch.compile(f, backend="aot_eager", fullgraph=True)(x, w).backward()
    x2, w2 = logits.clone().requires_grad_(), weights.clone().requires_grad_()
    f(x2, w2).backward()
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(w.grad, w2.grad)


# ------------------------------------------------------------------ bad inputs
def _replace(factors, **fields):
    import dataclasses

    return dataclasses.replace(factors, **fields)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda f, o: (_replace(f, comp_task=f.comp_task + 5), o), r"comp_task must index tasks in \[0, 3\)"),
        (lambda f, o: (_replace(f, left=f.left[:-1]), o), "left / right must hold"),
        (lambda f, o: (_replace(f, rows=f.rows + 1), o), "segment 0: 30 elements in 7 rows"),
        (lambda f, o: (_replace(f, left=f.left.int()), o), "factors.left must be a floating tensor"),
        (lambda f, o: (_replace(f, right=f.right.to("meta")), o), "all tensors must be on one device"),
    ],
)
def test_bad_factors_raise_clear_errors(change, message):
    base, factors, logits, weights, offsets = make_factored(**SMALL)
    factors, offsets = change(factors, offsets)
    with pytest.raises((ValueError, TypeError), match=message):
        lora_concrete_merge(base, factors, logits, weights, offsets, seed=0, backend="reference")


def test_offsets_other_than_the_factors_are_refused():
    base, factors, logits, weights, offsets = make_factored(**SMALL)
    moved = offsets.clone()
    moved[1] += 1
    with pytest.raises(ValueError, match="built for other segment offsets"):
        lora_concrete_merge(base, factors, logits, weights, moved, seed=0, backend="reference")


def test_weights_must_match_the_number_of_tasks():
    base, factors, logits, weights, offsets = make_factored(**SMALL)
    with pytest.raises(ValueError, match=r"weights must be task-wise \[n\]=\[3\]"):
        lora_concrete_merge(base, factors, logits, weights[:2], offsets, seed=0, backend="reference")


def test_from_segments_names_the_bad_segment():
    offsets = torch.tensor([0, 6, 12])
    with pytest.raises(ValueError, match=r"segment 1, task 0: factors \[3, 2\] @ \[2, 3\] do not give the segment's "
                                         r"\[2, 3\]"):
        LoraFactors.from_segments(offsets, [2, 2], [[], [(0, torch.ones(3, 2), torch.ones(2, 3), 1.0)]], 1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_gradient_alone_equals_it_taken_with_the_other(backend):
    # The backward forms only the wanted gradients (logits alone skip the component dots, weights alone skip g*a).
    base, factors, logits, weights, offsets = make_factored(**SMALL)
    g = torch.randn(base.numel(), generator=torch.Generator().manual_seed(6))
    kw = {"seed": 3, "step": 1, "backend": backend}
    _, gx, gw = run(base, factors, logits, weights, offsets, g, **kw)
    x = logits.clone().requires_grad_()
    concrete_merge(base, factors, x, weights, offsets, **kw).backward(g)
    w = weights.clone().requires_grad_()
    concrete_merge(base, factors, logits, w, offsets, **kw).backward(g)
    torch.testing.assert_close(x.grad, gx, rtol=0, atol=0)
    torch.testing.assert_close(w.grad, gw, rtol=0, atol=0)
    assert gw.abs().sum() > 0 and gx.abs().sum() > 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mask", ["relaxed", "hard"])
def test_start_draws_the_noise_at_the_global_indices_like_the_dense_op(backend, mask):
    # A shard of a longer model: with start, the factored op is the dense op with the same start (whose result is
    # that slice of the whole model's merge, tests/test_concrete_merge.py), forward and both gradients.
    base, factors, logits, weights, offsets = make_factored(**SMALL)
    dense = factors.densify(torch.float32)
    g = torch.randn(base.numel(), generator=torch.Generator().manual_seed(8))
    start = 2**33 + 12345
    kw = {"seed": 9, "step": 4, "mask": mask, "backend": backend}
    out, gx, gw = run(base, factors, logits, weights, offsets, g, start=start, **kw)
    ref_out, ref_gx, ref_gw = run(base, dense, logits, weights, offsets, g, start=start, **kw)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw, ref_gw, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gx, ref_gx, rtol=1e-4, atol=1e-5)
    unshifted, _, _ = run(base, factors, logits, weights, offsets, g, **kw)
    assert not torch.equal(out, unshifted)  # the noise moved with start
    with pytest.raises(ValueError, match="start must be an integer"):
        lora_concrete_merge(base, factors, logits, weights, offsets, seed=1, start=-1)
