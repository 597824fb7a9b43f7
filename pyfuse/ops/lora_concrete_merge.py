"""`lora_concrete_merge`: the fused Concrete merge with the task vectors kept as low-rank factors.

    out_j = base_j + r_j * sum_i w[i, seg(j)] * tau_ij,   tau_i[s] = sum of scale * L @ R over task i's factors

exactly `concrete_merge` on the densified task vectors (`LoraFactors.densify()`): the same mask (the same
Philox stream by flat position, phase `mask_sums`), the same per-segment rescale and the same fused backward
(`masked_forward` / `masked_backward` of `pyfuse.ops.masked_merge`). Only the two phases that read the task
vectors differ: they form `a_s = (L_s * c) @ R_s` tile by tile (see `pyfuse.ops.reference` for their meaning),
so no dense task vector exists at any time. The weight gradient comes out per component and is summed into
`[n, S]` here, once for every backend.
"""

from __future__ import annotations

import torch

from .factors import LoraFactors
from .masked_merge import (
    DEFAULT_TEMPERATURE,
    check_scalars,
    check_start,
    layerwise_weights,
    register_merge_op,
    to_i64,
    validate_merge,
)

__all__ = ["lora_concrete_merge"]

_NAME = "lora_concrete_merge"


def _component_segments(comp_offsets: torch.Tensor) -> torch.Tensor:
    counts = comp_offsets[1:] - comp_offsets[:-1]
    return torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts)


def _component_weights(weights, comp_task, comp_offsets, comp_scale):
    """c_k = w[task_k, seg_k] * scale_k, in the dtype of `weights` (the compute dtype)."""
    return weights[comp_task, _component_segments(comp_offsets)] * comp_scale.to(weights.dtype)


def _apply(phases, tensors):
    coef = _component_weights(tensors["weights"], tensors["comp_task"], tensors["comp_offsets"], tensors["comp_scale"])

    def apply(seg_scale, out):
        phases.lora_merge_apply(tensors["base"], tensors["left"], tensors["right"], tensors["rows"],
                                tensors["comp_offsets"], coef, tensors["offsets"], seg_scale, out)

    return apply


def _accumulate(phases, grad_out, tensors, step, temperature, start, need_logits, need_weights):
    weights, comp_task, comp_offsets, comp_scale = (tensors[key] for key in ("weights", "comp_task", "comp_offsets",
                                                                             "comp_scale"))
    coef = _component_weights(weights, comp_task, comp_offsets, comp_scale)

    def accumulate(seg_scale, seed_u64, mode_id, ga_out):
        comp_dot, seg_gam = phases.lora_backward_accumulate(
            grad_out, tensors["left"], tensors["right"], tensors["rows"], comp_offsets, coef, tensors["logits"],
            tensors["offsets"], seed_u64, step, temperature, mode_id, ga_out, need_logits, need_weights, start,
        )
        # dL/dw[i, s] = seg_scale[s] * sum of scale_k * comp_dot[k] over task i's components in s
        per_component = comp_scale.to(comp_dot.dtype) * comp_dot
        grad_weights = torch.zeros_like(weights).index_put_(
            (comp_task, _component_segments(comp_offsets)), per_component, accumulate=True
        )
        return grad_weights * seg_scale, seg_gam

    return accumulate


# Each backward product costs as much as the forward one here, so only the wanted gradients are formed.
_FACTORS = ("left", "right", "rows", "comp_offsets", "comp_task", "comp_scale")
_lora_merge_op = register_merge_op(_NAME, ("base", *_FACTORS, "logits", "weights", "offsets"),
                                   (*_FACTORS, "logits", "weights", "offsets"), _apply, _accumulate)


def _check_factors(factors: LoraFactors, offsets: torch.Tensor, n_weights: int) -> None:
    """Cheap consistency checks of the factors against the layout (host-side, O(S) work)."""
    for name in ("left", "right"):
        t = getattr(factors, name)
        if t.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            raise TypeError(f"factors.{name} must be a floating tensor, got {t.dtype}")
        if t.dim() != 1:
            raise ValueError(f"factors.{name} must be a flat 1-D buffer, got shape {list(t.shape)}")
    if torch.compiler.is_compiling():
        return
    if factors.offsets.shape != offsets.shape or not torch.equal(factors.offsets.to(offsets), offsets):
        raise ValueError("the factors were built for other segment offsets than the ones given")
    num_segments = offsets.numel() - 1
    if factors.rows.shape != (num_segments,) or factors.comp_offsets.shape != (num_segments + 1,):
        raise ValueError(f"factors.rows must be [S] and factors.comp_offsets [S+1] with S = {num_segments}")
    rows = factors.rows.tolist()
    lengths = (offsets[1:] - offsets[:-1]).tolist()
    ranks = (factors.comp_offsets[1:] - factors.comp_offsets[:-1]).tolist()
    bad = [s for s, (r, length, k) in enumerate(zip(rows, lengths, ranks)) if r <= 0 or length % r or k < 0]
    if bad:
        s = bad[0]
        raise ValueError(f"segment {s}: {lengths[s]} elements in {rows[s]} rows with {ranks[s]} components")
    num_components = int(factors.comp_offsets[-1])
    if factors.comp_task.shape != (num_components,) or factors.comp_scale.shape != (num_components,):
        raise ValueError(f"factors.comp_task and comp_scale must have one entry per component ({num_components})")
    if num_components and not 0 <= int(factors.comp_task.min()) <= int(factors.comp_task.max()) < n_weights:
        raise ValueError(f"factors.comp_task must index tasks in [0, {n_weights})")
    left = sum(r * k for r, k in zip(rows, ranks))
    right = sum(length // r * k for r, length, k in zip(rows, lengths, ranks))
    if factors.left.numel() != left or factors.right.numel() != right:
        raise ValueError(f"factors.left / right must hold {left} / {right} elements, got "
                         f"{factors.left.numel()} / {factors.right.numel()}")


def lora_concrete_merge(
    base: torch.Tensor,
    factors: LoraFactors,
    logits: torch.Tensor,
    weights: torch.Tensor,
    offsets: torch.Tensor,
    *,
    seed: int,
    step: int = 0,
    start: int = 0,
    temperature: float = DEFAULT_TEMPERATURE,
    mask: str = "relaxed",
    rescale: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """`concrete_merge(base, factors.densify(), logits, weights, offsets, ...)` without densifying.

    Same arguments and result as `pyfuse.ops.concrete_merge` (which calls this when given `LoraFactors`), `start`
    included;
    differentiable w.r.t. `logits` and `weights`.
    """
    if not isinstance(factors, LoraFactors):
        raise TypeError(f"factors must be LoraFactors, got {type(factors).__name__}")
    check_scalars(seed, step, temperature, mask)
    tensors = {"base": base, "logits": logits, "weights": weights, "offsets": offsets,
               "factors.left": factors.left, "factors.right": factors.right}
    name, offsets = validate_merge(base, logits, weights, offsets, backend, factors.n, tensors)
    check_start(start, logits.numel())
    _check_factors(factors, offsets, factors.n)
    device = logits.device
    out, _ = _lora_merge_op(
        base.contiguous(),
        factors.left.contiguous(),
        factors.right.contiguous(),
        factors.rows.to(device),
        factors.comp_offsets.to(device),
        factors.comp_task.to(device),
        factors.comp_scale.to(device),
        logits.contiguous(),
        layerwise_weights(weights, offsets.numel() - 1, logits.dtype),
        offsets,
        to_i64(seed),
        step,
        start,
        float(temperature),
        mask,
        bool(rescale),
        name,
    )
    return out
