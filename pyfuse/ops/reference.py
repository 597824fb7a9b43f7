"""The reference backend: the fused merge's phases in plain PyTorch ops (the oracle).

Every backend implements the same five phase functions with the same meaning; `pyfuse.ops.concrete_merge`
composes them, so only the phases differ between backends. Shapes: `D` elements, `n` tasks, `S`
segments; `offsets` is int64 `[S+1]`, strictly increasing from 0 to D; `weights` is fp32 `[n, S]`;
`mode` is one of `MODES` (0 relaxed, 1 hard, 2 threshold, 3 none). All arithmetic is in the dtype of
`logits`: fp32, or fp64 here only, so the hand-written backward can be gradchecked. The three phases that
draw the mask take a trailing `start` (default 0): the global flat index of element 0, at which the noise
of a shard of a longer flat model is drawn (its elements are `[start, start + D)` of that model).

- `mask_sums(logits, offsets, seed, step, temperature, mode, m_out, start) -> seg_sum [S]`
      writes the mask m_j into `m_out` (fp32 [D]) and returns the per-segment sums of m.
- `merge_apply(base, task_vectors, weights, offsets, seg_scale, m_inout) -> None`
      in place: m_inout[j] <- base[j] + m_inout[j] * seg_scale[s] * sum_i weights[i, s] * tv[i, j].
- `backward_accumulate(grad_out, task_vectors, logits, weights, offsets, seg_scale, seed, step,
      temperature, mode, ga_out, start) -> (grad_weights [n, S], seg_gam [S])`
      regenerates m; with a_j = sum_i w[i,s] tv[i,j]: grad_weights[i,s] = seg_scale[s] * sum_j g_j tv[i,j] m_j,
      seg_gam[s] = sum_j g_j a_j m_j, and ga_out[j] = g_j a_j.
- `backward_logits(ga_inout, logits, offsets, seg_scale, seg_corr, seed, step, temperature, start) -> None`
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
    if mode in (NONE, THRESHOLD):
        return mask_from_noise(logits, None, temperature, mode)
    u = concrete_uniform(seed, step, start, logits.numel(), device=logits.device)
    return mask_from_noise(logits, u, temperature, mode)


def mask_from_noise(x: torch.Tensor, u: torch.Tensor | None, temperature: float, mode: int) -> torch.Tensor:
    """The mask m from the logits and their uniforms u (unused by the "none" and "threshold" modes)."""
    if mode == NONE:
        return torch.ones_like(x)
    if mode == THRESHOLD:
        return (x > 0).to(x.dtype)
    u = u.to(x.dtype)
    noisy = torch.log(u) - torch.log1p(-u) + x
    if mode == HARD:
        return (noisy > 0).to(x.dtype)
    return torch.sigmoid(noisy / temperature)


def _segment_sum(values: torch.Tensor, seg: torch.Tensor, num_segments: int) -> torch.Tensor:
    return torch.zeros(num_segments, dtype=values.dtype, device=values.device).index_add_(0, seg, values)


def mask_sums(logits, offsets, seed, step, temperature, mode, m_out, start=0):
    m = concrete_mask(logits, seed, step, temperature, mode, start)
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
    grad_out, task_vectors, logits, weights, offsets, seg_scale, seed, step, temperature, mode, ga_out, start=0
):
    seg = segment_ids(offsets)
    num_segments = offsets.numel() - 1
    m = concrete_mask(logits, seed, step, temperature, mode, start)
    g = grad_out.to(logits.dtype)
    a = _combined(task_vectors, weights, seg)
    gm = g * m
    grad_weights = torch.stack(
        [_segment_sum(gm * tv.to(gm.dtype), seg, num_segments) for tv in task_vectors]
    ) * seg_scale
    ga_out.copy_(g * a)
    return grad_weights, _segment_sum(gm * a, seg, num_segments)


def backward_logits(ga_inout, logits, offsets, seg_scale, seg_corr, seed, step, temperature, start=0):
    seg = segment_ids(offsets)
    m = concrete_mask(logits, seed, step, temperature, RELAXED, start)
    ga_inout.copy_((ga_inout * seg_scale[seg] - seg_corr[seg]) * m * (1 - m) / temperature)


def uniform(seed, step, start, count, device=None):
    """The clamped uniforms u_j for j in [start, start + count)."""
    return concrete_uniform(seed, step, start, count, device=device)


# ---------------------------------------------------------------------------------------------
# The factored op's two phases (`pyfuse.ops.lora_concrete_merge`): the mask phases above are shared.
# Segment s holds L_s [rows_s, K_s] and R_s [K_s, cols_s] (see `pyfuse.ops.factors`); `coef` [K] is
# c_k = w[task_k, s] * scale_k, so the combination is a_s = (L_s * c_s) @ R_s.
#
# - `lora_merge_apply(base, left, right, rows, comp_offsets, coef, offsets, seg_scale, m_inout) -> None`
#       in place: m_inout[j] <- base[j] + m_inout[j] * seg_scale[s] * a_j.
# - `lora_backward_accumulate(grad_out, left, right, rows, comp_offsets, coef, logits, offsets, seed, step,
#       temperature, mode, ga_out, need_ga, need_dots, start) -> (comp_dot [K], seg_gam [S])`
#       regenerates m (its noise drawn from the global index `start` on); comp_dot[k] = sum_{j in s} g_j m_j
#       L_s[row_j, k] R_s[k, col_j] (the unscaled weight gradient of component k; zeros without `need_dots`),
#       seg_gam[s] = sum_j g_j a_j m_j and ga_out[j] = g_j a_j (zeros and ga_out untouched without `need_ga`: the
#       logits need them, the weights do not).
# ---------------------------------------------------------------------------------------------
def lora_segments(left, right, rows, comp_offsets, offsets):
    """(s, lo, hi, L_s, R_s, k0, k1) for every segment: its flat range, factor views and component range."""
    bounds, ks, num_rows = offsets.tolist(), comp_offsets.tolist(), rows.tolist()
    left_at = right_at = 0
    for s, r in enumerate(num_rows):
        lo, hi, k0, k1 = bounds[s], bounds[s + 1], ks[s], ks[s + 1]
        cols = (hi - lo) // r
        left_s = left[left_at: left_at + r * (k1 - k0)].view(r, k1 - k0)
        right_s = right[right_at: right_at + (k1 - k0) * cols].view(k1 - k0, cols)
        left_at += r * (k1 - k0)
        right_at += (k1 - k0) * cols
        yield s, lo, hi, left_s, right_s, k0, k1


def _lora_combined(left_s, right_s, coef_s, dtype):
    return ((left_s.to(dtype) * coef_s) @ right_s.to(dtype)).reshape(-1)


def lora_merge_apply(base, left, right, rows, comp_offsets, coef, offsets, seg_scale, m_inout):
    dtype = m_inout.dtype
    for s, lo, hi, left_s, right_s, k0, k1 in lora_segments(left, right, rows, comp_offsets, offsets):
        a = _lora_combined(left_s, right_s, coef[k0:k1], dtype)
        m_inout[lo:hi] = base[lo:hi].to(dtype) + m_inout[lo:hi] * seg_scale[s] * a


def lora_backward_accumulate(
    grad_out, left, right, rows, comp_offsets, coef, logits, offsets, seed, step, temperature, mode, ga_out,
    need_ga=True, need_dots=True, start=0,
):
    dtype = logits.dtype
    m = concrete_mask(logits, seed, step, temperature, mode, start)
    g = grad_out.to(dtype)
    comp_dot = torch.zeros(coef.numel(), dtype=dtype, device=logits.device)
    seg_gam = torch.zeros(offsets.numel() - 1, dtype=dtype, device=logits.device)
    for s, lo, hi, left_s, right_s, k0, k1 in lora_segments(left, right, rows, comp_offsets, offsets):
        gm = (g[lo:hi] * m[lo:hi]).view(left_s.shape[0], -1)
        if need_dots:
            comp_dot[k0:k1] = ((gm @ right_s.to(dtype).T) * left_s.to(dtype)).sum(0)
        if need_ga:
            a = _lora_combined(left_s, right_s, coef[k0:k1], dtype)
            seg_gam[s] = (gm.reshape(-1) * a).sum()
            ga_out[lo:hi] = g[lo:hi] * a
    return comp_dot, seg_gam
