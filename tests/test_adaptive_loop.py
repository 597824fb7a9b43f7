"""The bi-level loop against independent float64 re-derivations: gradients, inner-step semantics, the
memory design (one fused backward per pass, task graphs never coexisting), Concrete TA = TA at lr 0."""

from __future__ import annotations

import copy
import weakref

import pytest
import torch

import pyfuse
from pyfuse.adaptive import EVAL_STEP, AdaptiveLoop, RunOptions, Settings
from pyfuse.ops import philox, reference

from .adaptive_helpers import CLIP_TASKS, clip_head, clip_images, clip_problem, digits_problem

SEED, T = 1234, 0.5
QUIET = RunOptions(progress=False, backend="reference")


def _segments(offsets: torch.Tensor) -> torch.Tensor:
    lengths = offsets[1:] - offsets[:-1]
    return torch.repeat_interleave(torch.arange(len(lengths)), lengths)


def _mask64(logits: torch.Tensor, step: int, mode: str) -> torch.Tensor:
    """The mask of docs/concrete-merge.md in float64 from the shared Philox noise."""
    if mode == "threshold":
        return (logits > 0).double()
    u = philox.concrete_uniform(SEED, step, 0, logits.numel()).double()
    noisy = torch.log(u) - torch.log1p(-u) + logits
    return (noisy > 0).double() if mode == "hard" else torch.sigmoid(noisy / T)


def _merge64(tv: pyfuse.TaskVectors, m: torch.Tensor, w: torch.Tensor, rescale: bool = True) -> torch.Tensor:
    """out = b + r * sum_i w[i, seg] tau_i with r = m / segment mean of m, all in float64."""
    offsets = tv.layout.offsets
    seg = _segments(offsets)
    if rescale:
        means = torch.zeros(len(offsets) - 1, dtype=torch.float64).index_add_(0, seg, m)
        means = means / (offsets[1:] - offsets[:-1]).double()
        r = torch.where(means[seg] > 0, m / means[seg], torch.zeros_like(m))
    else:
        r = m
    w = w if w.dim() == 2 else w[:, None].expand(-1, len(offsets) - 1)
    return tv.base.double() + r * (w[:, seg] * tv.vectors.double()).sum(0)


def _clip_entropy64(model64, tv, theta: torch.Tensor, batch: int) -> torch.Tensor:
    """Summed entropy of the three CLIP tasks on their `batch`-th image batch, by plain autograd in float64."""
    params = tv.layout.unflatten(theta)
    total = theta.new_zeros(())
    for index in range(len(CLIP_TASKS)):
        head = clip_head(index).double()
        out = torch.func.functional_call(model64, params, (), {"pixel_values": clip_images(index)[batch].double()})
        p = head(out.pooler_output).softmax(-1)
        total = total + (-(p * torch.log(p + 1e-8)).sum(-1)).mean()
    return total


def _record(tensor: torch.Tensor, log: list) -> None:
    """Log (value, grad) of a leaf each time a backward accumulates into it."""
    tensor.register_post_accumulate_grad_hook(lambda t: log.append((t.detach().clone(), t.grad.clone())))


@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_meta_step_gradients_match_float64_autograd(granularity):
    model, tv, tasks = clip_problem()
    settings = Settings(method="concrete_adamerging", coefficients=granularity, meta_steps=1, inner_steps=1,
                        seed=SEED, temperature=T, eval_mask="relaxed")
    loop = AdaptiveLoop(model, tv, tasks, settings, QUIET)
    coef_log, logit_log = [], []
    _record(loop.merger.coefficients, coef_log)
    _record(loop.merger.logits, logit_log)
    loop.meta_step(0)
    # inner pass: coefficient gradient only; outer pass: logits gradient only
    assert len(coef_log) == 1 and len(logit_log) == 1

    model64 = copy.deepcopy(model).double()
    x = torch.zeros(tv.layout.numel, dtype=torch.float64)
    shape = loop.merger.coefficients.shape
    w = torch.full(shape, 0.3, dtype=torch.float64, requires_grad=True)
    _clip_entropy64(model64, tv, _merge64(tv, _mask64(x, 0, "relaxed"), w), batch=0).backward()
    inner_grad = w.grad
    torch.testing.assert_close(coef_log[0][1].double(), inner_grad, rtol=1e-4, atol=1e-7)

    # Adam's first step with lr 1 from 0.3, then the outer gradient with those coefficients held fixed
    w_updated = 0.3 - inner_grad / (inner_grad.abs() + 1e-8)
    x.requires_grad_(True)
    _clip_entropy64(model64, tv, _merge64(tv, _mask64(x, 0, "relaxed"), w_updated), batch=1).backward()
    scale = x.grad.abs().max()
    torch.testing.assert_close(logit_log[0][1].double(), x.grad, rtol=1e-3, atol=1e-5 * float(scale))
    # k_proj biases have a zero gradient in exact arithmetic (softmax ignores a per-query shift), where Adam's
    # sign-like first step follows rounding noise: those coefficients (which change no output) are left out.
    clear = inner_grad.abs() > 1e-4
    assert clear.float().mean() > 0.8
    torch.testing.assert_close(loop.merger.coefficients.detach().double()[clear], w_updated[clear], rtol=1e-5,
                               atol=1e-6)


def test_inner_steps_reset_coefficients_and_hold_mask_fixed():
    model, tv, tasks = clip_problem()
    settings = Settings(method="concrete_adamerging", coefficients="layer", meta_steps=2, inner_steps=2, seed=SEED,
                        eval_mask="relaxed", mask_lr=0.5)
    loop = AdaptiveLoop(model, tv, tasks, settings, QUIET)
    coef_log, logit_log = [], []
    _record(loop.merger.coefficients, coef_log)
    _record(loop.merger.logits, logit_log)
    for t in range(2):
        loop.meta_step(t)
    assert len(coef_log) == 4 and len(logit_log) == 2
    values = [value for value, _ in coef_log]
    init = torch.full_like(values[0], 0.3)
    assert torch.equal(values[0], init) and torch.equal(values[2], init)  # reset at every outer step
    assert not torch.equal(values[1], init)  # the second inner step starts from the first's update
    # the logits got gradients only in the two outer passes, and the second saw the first's update
    assert not torch.equal(logit_log[1][0], torch.zeros_like(logit_log[1][0]))


def test_inner_gradient_uses_the_step_counter_and_detached_mask():
    """At step 1 with nonzero logits, the inner coefficient gradient is the float64 one for mask sample 1."""
    model, tv, tasks = clip_problem()
    settings = Settings(method="concrete_adamerging", coefficients="task", meta_steps=2, inner_steps=1, seed=SEED,
                        eval_mask="relaxed")
    loop = AdaptiveLoop(model, tv, tasks, settings, QUIET)
    with torch.no_grad():
        loop.merger.logits.copy_(torch.linspace(-2, 2, tv.layout.numel))
    for stream in loop.streams:  # as if step 0 had drawn its two batches per task
        stream.skip_to(2)
    log = []
    _record(loop.merger.coefficients, log)
    loop.meta_step(1)
    model64 = copy.deepcopy(model).double()
    w = torch.full((tv.n,), 0.3, dtype=torch.float64, requires_grad=True)
    x = torch.linspace(-2, 2, tv.layout.numel, dtype=torch.float32).double()
    _clip_entropy64(model64, tv, _merge64(tv, _mask64(x, 1, "relaxed"), w), batch=2).backward()
    torch.testing.assert_close(log[0][1].double(), w.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("mode", ["relaxed", "hard", "threshold"])
@pytest.mark.parametrize("rescale", [True, False])
def test_concrete_ta_at_zero_lr_is_task_arithmetic_under_the_same_mask(mode, rescale):
    model, tv, tasks = digits_problem()
    result = pyfuse.concrete_task_arithmetic(model, tv, tasks, steps=3, mask_lr=0.0, eval_mask=mode, seed=SEED,
                                             rescale=rescale, options=QUIET)
    assert torch.equal(result.logits, torch.zeros_like(result.logits))
    zeros = torch.zeros(tv.layout.numel, dtype=torch.float64)
    expected = _merge64(tv, _mask64(zeros, EVAL_STEP, mode), torch.full((tv.n,), 0.3, dtype=torch.float64), rescale)
    torch.testing.assert_close(result.flat.double(), expected, rtol=1e-5, atol=1e-6)
    assert result.report["eval_mask"] == {"mode": mode, "seed": SEED, "step": EVAL_STEP, "temperature": 0.5,
                                          "rescale": rescale}


def test_one_fused_backward_per_pass_and_task_graphs_never_coexist(monkeypatch):
    model, tv, tasks = digits_problem()
    calls = []
    original = reference.backward_accumulate
    monkeypatch.setattr(reference, "backward_accumulate", lambda *a: calls.append(1) or original(*a))
    outputs: list[weakref.ref] = []

    def watched(task: pyfuse.Task) -> pyfuse.Task:
        def logits(call, batch):
            assert all(ref() is None for ref in outputs), "a previous task's graph is still alive"
            out = task.logits(call, batch)
            outputs.append(weakref.ref(out))
            return out

        return pyfuse.Task(task.name, task.batches, logits)

    settings = Settings(method="concrete_adamerging", coefficients="layer", meta_steps=2, inner_steps=1,
                        adapt_steps=2, seed=SEED, eval_mask="hard")
    AdaptiveLoop(model, tv, [watched(t) for t in tasks], settings, QUIET).run()
    # two passes per meta step (inner, outer) and one per adapt step, whatever the number of tasks
    assert len(calls) == 2 * 2 + 2
    assert len(outputs) == 3 * (2 * 2 + 2)


def test_bf16_task_vectors_accumulate_in_fp32():
    model, tv, tasks = digits_problem(dtype=torch.bfloat16)
    result = pyfuse.adamerging(model, tv, tasks, granularity="task", steps=2, options=QUIET)
    expected = _merge64(tv, torch.ones(tv.layout.numel, dtype=torch.float64), result.coefficients.double())
    assert result.flat.dtype == torch.float32
    torch.testing.assert_close(result.flat.double(), expected, rtol=1e-5, atol=1e-6)


def test_clamp_applies_inside_the_merge():
    model, tv, tasks = clip_problem()
    settings = Settings(method="concrete_adamerging", coefficients="layer", meta_steps=1, inner_steps=1, clamp=True,
                        seed=SEED, eval_mask="threshold")
    loop = AdaptiveLoop(model, tv, tasks, settings, QUIET)
    loop.meta_step(0)
    raw = loop.merger.coefficients.detach()
    # Adam's first step with lr 1 moves most coefficients by ~1 from 0.3, out of [0, 1]
    assert (raw > 1).any() and (raw < 0).any()
    with torch.no_grad():
        loop.merger.logits.fill_(1.0)  # threshold mask keeps everything: the merge is b + sum_i w tau_i
    expected = _merge64(tv, torch.ones(tv.layout.numel, dtype=torch.float64), raw.double().clamp(0, 1))
    torch.testing.assert_close(loop.merged_flat().double(), expected, rtol=1e-5, atol=1e-6)


def test_mismatched_tasks_are_named():
    model, tv, tasks = digits_problem()
    with pytest.raises(ValueError, match="do not match the task vectors"):
        pyfuse.adamerging(model, tv, tasks[:2], steps=1, options=QUIET)
    with pytest.raises(ValueError, match="granularity"):
        pyfuse.adamerging(model, tv, tasks, granularity="row", steps=1, options=QUIET)
    with pytest.raises(ValueError, match="eval_mask"):
        pyfuse.concrete_task_arithmetic(model, tv, tasks, steps=1, eval_mask="none", options=QUIET)
