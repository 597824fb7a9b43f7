"""The reference backend: the fused merge's phases in plain PyTorch ops (the oracle).

Every backend implements the same five phase functions with the same meaning; `pyfuse.ops.concrete_merge`
composes them, so only the phases differ between backends. Shapes: `D` elements, `n` tasks, `S`
segments; `offsets` is int64 `[S+1]`, strictly increasing from 0 to D; `weights` is fp32 `[n, S]`;
`mode` is one of `MODES` (0 relaxed, 1 hard, 2 threshold, 3 none). All arithmetic is in the dtype of
`logits`: fp32, or fp64 here only, so the hand-written backward can be gradchecked.

- `mask_sums(logits, offsets, seed, step, temperature, mode, m_out) -> seg_sum [S]`
      writes the mask m_j into `m_out` (fp32 [D]) and returns the per-segment sums of m.
- `merge_apply(base, task_vectors, weights, offsets, seg_scale, m_inout) -> None`
      in place: m_inout[j] <- base[j] + m_inout[j] * seg_scale[s] * sum_i weights[i, s] * tv[i, j].
- `backward_accumulate(grad_out, task_vectors, logits, weights, offsets, seg_scale, seed, step,
      temperature, mode, ga_out) -> (grad_weights [n, S], seg_gam [S])`
      regenerates m; with a_j = sum_i w[i,s] tv[i,j]: grad_weights[i,s] = seg_scale[s] * sum_j g_j tv[i,j] m_j,
      seg_gam[s] = sum_j g_j a_j m_j, and ga_out[j] = g_j a_j.
- `backward_logits(ga_inout, logits, offsets, seg_scale, seg_corr, seed, step, temperature) -> None`
      relaxed mode only, in place: ga[k] <- (ga[k] * seg_scale[s] - seg_corr[s]) * m_k (1 - m_k) / T.
"""

from __future__ import annotations

import torch

from .philox import concrete_uniform

MODES = ("relaxed", "hard", "threshold", "none")
RELAXED, HARD, THRESHOLD, NONE = range(4)


def segment_ids(offsets: torch.Tensor) -> torch.Tensor:
    """The segment index of every element, [D] int64."""
    lengths = offsets[1:] - offsets[:-1]
    return torch.repeat_interleave(torch.arange(len(lengths), device=offsets.device), lengths)


def concrete_mask(
    logits: torch.Tensor, seed: int, step: int, temperature: float, mode: int, start: int = 0
) -> torch.Tensor:
    """The mask m for elements [start, start + len(logits)) of the global index space."""
    x = logits
    if mode == NONE:
        return torch.ones_like(x)
    if mode == THRESHOLD:
        return (x > 0).to(x.dtype)
    u = concrete_uniform(seed, step, start, x.numel(), device=x.device).to(x.dtype)
    noisy = torch.log(u) - torch.log1p(-u) + x
    if mode == HARD:
        return (noisy > 0).to(x.dtype)
    return torch.sigmoid(noisy / temperature)


def _segment_sum(values: torch.Tensor, seg: torch.Tensor, num_segments: int) -> torch.Tensor:
    return torch.zeros(num_segments, dtype=values.dtype, device=values.device).index_add_(0, seg, values)


def mask_sums(logits, offsets, seed, step, temperature, mode, m_out):
    m = concrete_mask(logits, seed, step, temperature, mode)
    m_out.copy_(m)
    return _segment_sum(m, segment_ids(offsets), offsets.numel() - 1)


def _combined(task_vectors, weights, seg):
    # a_j = sum_i w[i, seg(j)] * tv[i, j], accumulated in the compute dtype
    return (weights[:, seg] * task_vectors.to(weights.dtype)).sum(0)


def merge_apply(base, task_vectors, weights, offsets, seg_scale, m_inout):
    seg = segment_ids(offsets)
    a = _combined(task_vectors, weights, seg)
    m_inout.copy_(base.to(m_inout.dtype) + m_inout * seg_scale[seg] * a)


def backward_accumulate(
    grad_out, task_vectors, logits, weights, offsets, seg_scale, seed, step, temperature, mode, ga_out
):
    seg = segment_ids(offsets)
    num_segments = offsets.numel() - 1
    m = concrete_mask(logits, seed, step, temperature, mode)
    g = grad_out.to(logits.dtype)
    a = _combined(task_vectors, weights, seg)
    gm = g * m
    grad_weights = torch.stack(
        [_segment_sum(gm * tv.to(gm.dtype), seg, num_segments) for tv in task_vectors]
    ) * seg_scale
    ga_out.copy_(g * a)
    return grad_weights, _segment_sum(gm * a, seg, num_segments)


def backward_logits(ga_inout, logits, offsets, seg_scale, seg_corr, seed, step, temperature):
    seg = segment_ids(offsets)
    m = concrete_mask(logits, seed, step, temperature, RELAXED)
    ga_inout.copy_((ga_inout * seg_scale[seg] - seg_corr[seg]) * m * (1 - m) / temperature)


def uniform(seed, step, start, count, device=None):
    """The clamped uniforms u_j for j in [start, start + count)."""
    return concrete_uniform(seed, step, start, count, device=device)
