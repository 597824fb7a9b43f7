"""The scaffolding both fused merge ops share (`concrete_merge` on dense task vectors, `lora_concrete_merge` on
LoRA factors): argument checks, the masked forward and fused backward around an op's own phases, and
`register_merge_op`, which registers an op's forward and backward with `torch.library` (fake kernels and autograd
included) from its tensor arguments and two callbacks.

Every merge op takes its tensors, then the same scalars (`MERGE_SCALARS`): the Philox `seed` and `step`, the
global index `start` of element 0, the Concrete `temperature`, the mask `mode`, `rescale` and the `backend`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..finite import check_finite
from . import backends
from .profiling import nvtx_range
from .reference import MODES, RELAXED

DEFAULT_TEMPERATURE = 0.5
"""The Concrete temperature T every op and method defaults to (the paper's)."""
_FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


# ---------------------------------------------------------------------------------------------
# Validation: every error names the argument and the offending shape, dtype or value.
# ---------------------------------------------------------------------------------------------
def check_scalars(seed: int, step: int, temperature: float, mask: str) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise ValueError(f"seed must be an integer in [0, 2^64), got {seed!r}")
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < 2**32:
        raise ValueError(f"step must be an integer in [0, 2^32), got {step!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if mask not in MODES:
        raise ValueError(f"mask must be one of {MODES}, got {mask!r}")


def check_logits(logits: torch.Tensor, compute_dtypes: tuple[torch.dtype, ...]) -> None:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 1:
        raise ValueError(f"logits must be a 1-D tensor [D], got shape {tuple(getattr(logits, 'shape', ()))}")
    if logits.dtype not in compute_dtypes:
        raise TypeError(f"logits must be {' or '.join(map(str, compute_dtypes))} for this backend, got {logits.dtype}")
    # Data-dependent checks can't be traced; under torch.compile they are left to eager runs. A NaN or inf
    # anywhere makes the sum non-finite, and one reduction is far cheaper than an elementwise isfinite pass;
    # only then (or when finite values overflow the sum) is the offending element looked for.
    if torch.compiler.is_compiling() or bool(torch.isfinite(logits.sum())):
        return
    if not bool(torch.isfinite(logits).all()):
        bad = int((~torch.isfinite(logits)).nonzero()[0])
        raise ValueError(f"logits must be finite; logits[{bad}] = {logits[bad].item()}")


def check_offsets(offsets: torch.Tensor, numel: int) -> torch.Tensor:
    if not isinstance(offsets, torch.Tensor) or offsets.dim() != 1 or offsets.numel() < 2:
        raise ValueError(f"offsets must be a 1-D integer tensor [S+1] with S >= 1, got {offsets!r:.80}")
    if offsets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"offsets must be int64 (or int32), got {offsets.dtype}")
    if torch.compiler.is_compiling():
        return offsets.to(torch.int64).contiguous()
    host = offsets.tolist()
    if host[0] != 0 or host[-1] != numel:
        raise ValueError(f"offsets must run from 0 to D={numel}, got {host[0]} .. {host[-1]}")
    steps = [b - a for a, b in zip(host[:-1], host[1:])]
    if min(steps) <= 0:
        s = steps.index(min(steps))
        raise ValueError(f"offsets must be strictly increasing; segment {s} is [{host[s]}, {host[s + 1]})")
    return offsets.to(torch.int64).contiguous()


def check_start(start: int, numel: int) -> None:
    if isinstance(start, bool) or not isinstance(start, int) or start < 0 or start + numel > 2**63:
        raise ValueError(f"start must be an integer with 0 <= start and start + D <= 2^63 (D = {numel}), got {start!r}")


def validate_merge(base, logits, weights, offsets, backend_name, n, tensors):
    """Checks every merge op shares: devices, the logits, base and weights against D, S and n, and the offsets.

    `tensors` maps names to every tensor argument (the op's own ones included, for the device check and
    the floating-dtype check of those named "base", "task_vectors" and "weights"); returns the resolved
    backend and the int64 offsets.
    """
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all tensors must be on one device; got {listing}")
    resolved = backends.resolve(backend_name, base.device)
    check_logits(logits, backends.BACKENDS[resolved].compute_dtypes)
    numel = logits.numel()
    if base.dim() != 1 or base.numel() != numel:
        raise ValueError(f"base must be [D] with D = len(logits) = {numel}, got shape {tuple(base.shape)}")
    for name in ("base", "task_vectors", "weights"):
        if name in tensors and tensors[name].dtype not in _FLOATS:
            raise TypeError(f"{name} must be a floating tensor, got {tensors[name].dtype}")
    if not torch.compiler.is_compiling():  # weights are [n] or [n, S]: checking them costs nothing
        check_finite(weights, "weights")
    offsets = check_offsets(offsets, numel)
    num_segments = offsets.numel() - 1
    if weights.shape not in ((n,), (n, num_segments)):
        raise ValueError(
            f"weights must be task-wise [n]={[n]} or layer-wise [n, S]={[n, num_segments]}, got {list(weights.shape)}"
        )
    return resolved, offsets


# ---------------------------------------------------------------------------------------------
# The registered ops. Seeds travel through the op schema as signed 64-bit words.
# ---------------------------------------------------------------------------------------------
def to_i64(seed: int) -> int:
    return seed - 2**64 if seed >= 2**63 else seed


def to_u64(seed: int) -> int:
    return seed + 2**64 if seed < 0 else seed


def _segment_scale(seg_sum: torch.Tensor, offsets: torch.Tensor, rescale: bool) -> torch.Tensor:
    """1 / mean of the mask per segment (0 for an all-zero segment); 1 without rescaling."""
    if not rescale:
        return torch.ones_like(seg_sum)
    lengths = (offsets[1:] - offsets[:-1]).to(seg_sum.dtype)
    return torch.where(seg_sum > 0, lengths / seg_sum, torch.zeros_like(seg_sum))


def masked_forward(name, phases, logits, offsets, seed, step, temperature, mode, rescale, apply, start=0):
    """The forward every merge op shares: sample the mask (phase `mask_sums`, its noise drawn from the global
    index `start` on), its per-segment rescale, then `apply(seg_scale, m_inout)` (in place: m <- base + m *
    seg_scale[s] * a). Returns (out, seg_sum)."""
    out = torch.empty(logits.numel(), dtype=logits.dtype, device=logits.device)
    with nvtx_range(f"{name}.forward"):
        with nvtx_range(f"{name}.mask_sums"):
            seg_sum = phases.mask_sums(logits, offsets, to_u64(seed), step, temperature, MODES.index(mode), out,
                                       start)
        seg_scale = _segment_scale(seg_sum, offsets, rescale)
        with nvtx_range(f"{name}.merge_apply"):
            apply(seg_scale, out)
    return out, seg_sum


def masked_backward(name, phases, logits, offsets, seg_sum, seed, step, temperature, mode, rescale, need_logits,
                    accumulate, start=0):
    """The fused backward every merge op shares. `accumulate(seg_scale, seed, mode_id, ga_out)` regenerates the
    mask, writes g * a into `ga_out` and returns (grad_weights [n, S], seg_gam [S]) (see the reference's
    `backward_accumulate`); the logits' gradient then follows from the mask alone (phase `backward_logits`).
    Without `need_logits` (the logits are not trained in this pass) that last phase is skipped and the first
    returned tensor is left unfilled: the caller drops it."""
    seed, mode_id = to_u64(seed), MODES.index(mode)
    seg_scale = _segment_scale(seg_sum, offsets, rescale)
    grad_logits = torch.empty_like(logits)
    with nvtx_range(f"{name}.backward"):
        with nvtx_range(f"{name}.backward_accumulate"):
            grad_weights, seg_gam = accumulate(seg_scale, seed, mode_id, grad_logits)
        if not need_logits:
            pass
        elif mode_id != RELAXED:  # hard, threshold and constant masks have zero derivative in the logits
            grad_logits.zero_()
        else:
            with nvtx_range(f"{name}.backward_logits"):
                if rescale:
                    # d r_j / d m_k couples a segment through its mean: the -sum_j g_j a_j m_j / (|s| M_s^2) term
                    lengths = (offsets[1:] - offsets[:-1]).to(seg_sum.dtype)
                    seg_corr = seg_gam * seg_scale * seg_scale / lengths
                else:
                    seg_corr = torch.zeros_like(seg_sum)
                phases.backward_logits(grad_logits, logits, offsets, seg_scale, seg_corr, seed, step, temperature,
                                       start)
    return grad_logits, grad_weights


def layerwise_weights(weights: torch.Tensor, num_segments: int, dtype: torch.dtype) -> torch.Tensor:
    """Task-wise `[n]` or layer-wise `[n, S]` weights as a contiguous layer-wise `[n, S]` tensor of `dtype`."""
    layerwise = weights if weights.dim() == 2 else weights.unsqueeze(1).expand(-1, num_segments)
    return layerwise.to(dtype).contiguous()


# ---------------------------------------------------------------------------------------------
# Registration: one helper for every merge op's forward, backward, fake kernels and autograd.
# ---------------------------------------------------------------------------------------------
MERGE_SCALARS = ("seed", "step", "start", "temperature", "mode", "rescale", "backend")
_SCALAR_SCHEMA = "int seed, int step, int start, float temperature, str mode, bool rescale, str backend"
# apply(phases, tensors) -> the forward's `apply(seg_scale, m_inout)` (see `masked_forward`)
ApplyFactory = Callable[[Any, dict[str, torch.Tensor]], Callable[[torch.Tensor, torch.Tensor], None]]
# accumulate(phases, grad_out, tensors, step, temperature, start, need_logits, need_weights) -> the backward's
# `accumulate(seg_scale, seed, mode_id, ga_out)` (see `masked_backward`)
AccumulateFactory = Callable[..., Callable[[torch.Tensor, int, int, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]]


def register_merge_op(name: str, inputs: Sequence[str], saved: Sequence[str], make_apply: ApplyFactory,
                      make_accumulate: AccumulateFactory) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """Register `pyfuse::{name}` (tensors `inputs`, then `MERGE_SCALARS`; returns (out [D], seg_sum [S])) and its
    fused backward `pyfuse::{name}_backward`, differentiable w.r.t. "logits" and "weights"; returns the forward op.

    The backward op takes the tensors `saved` (which must include "logits", "weights" and "offsets"), the forward's
    seg_sum, the scalars and whether each gradient is wanted; only the wanted ones are formed where the op's
    phases can skip work.
    """
    tensors = ", ".join(f"Tensor {key}" for key in inputs)
    kept = ", ".join(f"Tensor {key}" for key in saved)
    names, count, kept_count = tuple(inputs), len(inputs), len(saved)
    logits_at, weights_at = inputs.index("logits"), inputs.index("weights")

    def forward(*args: Any) -> tuple[torch.Tensor, torch.Tensor]:
        values = dict(zip(inputs, args))
        seed, step, start, temperature, mode, rescale, backend = args[count:]
        phases = backends.phases(backend)
        return masked_forward(name, phases, values["logits"], values["offsets"], seed, step, temperature, mode,
                              rescale, make_apply(phases, values), start)

    def backward_op(grad_out: torch.Tensor, *args: Any) -> tuple[torch.Tensor, torch.Tensor]:
        values = dict(zip(saved, args))
        seg_sum = args[kept_count]
        seed, step, start, temperature, mode, rescale, backend, need_logits, need_weights = args[kept_count + 1:]
        phases = backends.phases(backend)
        logits = values["logits"]
        accumulate = make_accumulate(phases, grad_out.to(logits.dtype).contiguous(), values, step, temperature, start,
                                     need_logits, need_weights)
        return masked_backward(name, phases, logits, values["offsets"], seg_sum, seed, step, temperature, mode,
                               rescale, need_logits, accumulate, start)

    op = torch.library.custom_op(f"pyfuse::{name}", forward, mutates_args=(),
                                 schema=f"({tensors}, {_SCALAR_SCHEMA}) -> (Tensor, Tensor)")
    backward = torch.library.custom_op(
        f"pyfuse::{name}_backward", backward_op, mutates_args=(),
        schema=f"(Tensor grad_out, {kept}, Tensor seg_sum, {_SCALAR_SCHEMA}, bool need_logits, bool need_weights) "
               "-> (Tensor, Tensor)")

    @op.register_fake
    def _(*args: Any) -> tuple[torch.Tensor, torch.Tensor]:
        values = dict(zip(inputs, args))
        logits = values["logits"]
        return logits.new_empty(logits.shape), logits.new_empty(values["offsets"].shape[0] - 1)

    @backward.register_fake
    def _(grad_out: torch.Tensor, *args: Any) -> tuple[torch.Tensor, torch.Tensor]:
        values = dict(zip(saved, args))
        return values["logits"].new_empty(values["logits"].shape), values["weights"].new_empty(values["weights"].shape)

    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, torch.Tensor]) -> None:
        values = dict(zip(names, inputs))
        ctx.save_for_backward(*(values[key] for key in saved), output[1])
        ctx.scalars = inputs[count:]
        ctx.weights_dtype = values["weights"].dtype

    def differentiate(ctx: Any, grad_out: torch.Tensor, _grad_seg_sum: torch.Tensor) -> tuple[Any, ...]:
        need_logits, need_weights = ctx.needs_input_grad[logits_at], ctx.needs_input_grad[weights_at]
        grad_logits, grad_weights = backward(grad_out, *ctx.saved_tensors, *ctx.scalars, need_logits, need_weights)
        grads: list[Any] = [None] * (count + len(MERGE_SCALARS))
        grads[logits_at] = grad_logits if need_logits else None
        grads[weights_at] = grad_weights.to(ctx.weights_dtype) if need_weights else None
        return tuple(grads)

    op.register_autograd(differentiate, setup_context=setup_context)
    return op
