"""`concrete_merge`: sample the Concrete mask, apply and rescale it, and sum the weighted task vectors.

    out_j = base_j + r_j * sum_i w[i, seg(j)] * tv[i, j],   r_j = m_j / mean_{k in seg(j)} m_k

Registered once with `torch.library` (forward and fused backward are both ops, so autograd and
`torch.compile` see one op each); the backend named by `backend=` (or picked by device for "auto")
runs the phases documented in `pyfuse.ops.reference`. A segment whose mask is all zero (possible with
hard or threshold masks) has nothing to rescale: its elements stay at the base value.
"""

from __future__ import annotations

import math

import torch

from ..finite import check_finite
from . import backends
from .factors import LoraFactors
from .profiling import nvtx_range
from .reference import MODES, RELAXED

__all__ = ["DEFAULT_TEMPERATURE", "MODES", "concrete_merge", "sample_concrete_mask", "sample_uniform"]

DEFAULT_TEMPERATURE = 0.5
"""The Concrete temperature T every op and method defaults to (the paper's)."""
_FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


# ---------------------------------------------------------------------------------------------
# Validation: every error names the argument and the offending shape, dtype or value.
# ---------------------------------------------------------------------------------------------
def _check_scalars(seed: int, step: int, temperature: float, mask: str) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise ValueError(f"seed must be an integer in [0, 2^64), got {seed!r}")
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < 2**32:
        raise ValueError(f"step must be an integer in [0, 2^32), got {step!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if mask not in MODES:
        raise ValueError(f"mask must be one of {MODES}, got {mask!r}")


def _check_logits(logits: torch.Tensor, compute_dtypes: tuple[torch.dtype, ...]) -> None:
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


def _check_offsets(offsets: torch.Tensor, numel: int) -> torch.Tensor:
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


def _check_start(start: int, numel: int) -> None:
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
    _check_logits(logits, backends.BACKENDS[resolved].compute_dtypes)
    numel = logits.numel()
    if base.dim() != 1 or base.numel() != numel:
        raise ValueError(f"base must be [D] with D = len(logits) = {numel}, got shape {tuple(base.shape)}")
    for name in ("base", "task_vectors", "weights"):
        if name in tensors and tensors[name].dtype not in _FLOATS:
            raise TypeError(f"{name} must be a floating tensor, got {tensors[name].dtype}")
    if not torch.compiler.is_compiling():  # weights are [n] or [n, S]: checking them costs nothing
        check_finite(weights, "weights")
    offsets = _check_offsets(offsets, numel)
    num_segments = offsets.numel() - 1
    if weights.shape not in ((n,), (n, num_segments)):
        raise ValueError(
            f"weights must be task-wise [n]={[n]} or layer-wise [n, S]={[n, num_segments]}, got {list(weights.shape)}"
        )
    return resolved, offsets


def _validate(base, task_vectors, logits, weights, offsets, backend_name):
    tensors = {"base": base, "task_vectors": task_vectors, "logits": logits, "weights": weights, "offsets": offsets}
    if isinstance(task_vectors, torch.Tensor) and isinstance(logits, torch.Tensor):
        numel = logits.numel()
        if task_vectors.dim() != 2 or task_vectors.shape[1] != numel or task_vectors.shape[0] < 1:
            raise ValueError(
                f"task_vectors must be [n, D] with D = {numel}, n >= 1, got shape {tuple(task_vectors.shape)}"
            )
    n = task_vectors.shape[0] if isinstance(task_vectors, torch.Tensor) and task_vectors.dim() == 2 else 0
    return validate_merge(base, logits, weights, offsets, backend_name, n, tensors)


# ---------------------------------------------------------------------------------------------
# The registered ops. Seeds travel through the op schema as signed 64-bit words.
# ---------------------------------------------------------------------------------------------
def _to_i64(seed: int) -> int:
    return seed - 2**64 if seed >= 2**63 else seed


def _to_u64(seed: int) -> int:
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
            seg_sum = phases.mask_sums(logits, offsets, _to_u64(seed), step, temperature, MODES.index(mode), out,
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
    seed, mode_id = _to_u64(seed), MODES.index(mode)
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


@torch.library.custom_op("pyfuse::concrete_merge", mutates_args=())
def _merge_op(
    base: torch.Tensor,
    task_vectors: torch.Tensor,
    logits: torch.Tensor,
    weights: torch.Tensor,
    offsets: torch.Tensor,
    seed: int,
    step: int,
    start: int,
    temperature: float,
    mode: str,
    rescale: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    phases = backends.phases(backend)

    def apply(seg_scale, out):
        phases.merge_apply(base, task_vectors, weights, offsets, seg_scale, out)

    return masked_forward("concrete_merge", phases, logits, offsets, seed, step, temperature, mode, rescale, apply,
                          start)


@_merge_op.register_fake
def _(base, task_vectors, logits, weights, offsets, seed, step, start, temperature, mode, rescale, backend):
    return logits.new_empty(logits.shape), logits.new_empty(offsets.shape[0] - 1)


@torch.library.custom_op("pyfuse::concrete_merge_backward", mutates_args=())
def _merge_backward_op(
    grad_out: torch.Tensor,
    task_vectors: torch.Tensor,
    logits: torch.Tensor,
    weights: torch.Tensor,
    offsets: torch.Tensor,
    seg_sum: torch.Tensor,
    seed: int,
    step: int,
    start: int,
    temperature: float,
    mode: str,
    rescale: bool,
    backend: str,
    need_logits: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    phases = backends.phases(backend)
    grad_out = grad_out.to(logits.dtype).contiguous()

    def accumulate(seg_scale, seed_u64, mode_id, ga_out):
        return phases.backward_accumulate(
            grad_out, task_vectors, logits, weights, offsets, seg_scale, seed_u64, step, temperature, mode_id, ga_out,
            start,
        )

    return masked_backward(
        "concrete_merge", phases, logits, offsets, seg_sum, seed, step, temperature, mode, rescale, need_logits,
        accumulate, start,
    )


@_merge_backward_op.register_fake
def _(grad_out, task_vectors, logits, weights, offsets, seg_sum, seed, step, start, temperature, mode, rescale,
      backend, need_logits):
    return logits.new_empty(logits.shape), weights.new_empty(weights.shape)


def _setup_context(ctx, inputs, output):
    base, task_vectors, logits, weights, offsets, seed, step, start, temperature, mode, rescale, backend = inputs
    ctx.save_for_backward(task_vectors, logits, weights, offsets, output[1])
    ctx.args = (seed, step, start, temperature, mode, rescale, backend)
    ctx.weights_dtype = weights.dtype


def _backward(ctx, grad_out, _grad_seg_sum):
    task_vectors, logits, weights, offsets, seg_sum = ctx.saved_tensors
    need_logits = ctx.needs_input_grad[2]
    grad_logits, grad_weights = _merge_backward_op(
        grad_out, task_vectors, logits, weights, offsets, seg_sum, *ctx.args, need_logits
    )
    grad_logits = grad_logits if need_logits else None
    return (None, None, grad_logits, grad_weights.to(ctx.weights_dtype), None, None, None, None, None, None, None,
            None)


_merge_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------
def layerwise_weights(weights: torch.Tensor, num_segments: int, dtype: torch.dtype) -> torch.Tensor:
    """Task-wise `[n]` or layer-wise `[n, S]` weights as a contiguous layer-wise `[n, S]` tensor of `dtype`."""
    layerwise = weights if weights.dim() == 2 else weights.unsqueeze(1).expand(-1, num_segments)
    return layerwise.to(dtype).contiguous()


def concrete_merge(
    base: torch.Tensor,
    task_vectors: torch.Tensor | LoraFactors,
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
    """The merged flat parameters `[D]`, differentiable w.r.t. `logits` and `weights`.

    Args:
        base: pre-trained parameters `[D]` (fp32/bf16/fp16).
        task_vectors: `[n, D]` fine-tuned minus base (fp32/bf16/fp16; accumulated in fp32), or `LoraFactors`
            (task vectors kept as low-rank factors; merged by `lora_concrete_merge`, the same mask and result).
        logits: mask logits `[D]`, fp32.
        weights: task-wise `[n]` or layer-wise `[n, S]` merge coefficients.
        offsets: int64 `[S+1]` segment boundaries (one segment per parameter tensor).
        seed, step: the Philox key and the outer-loop step; the same pair gives the same mask everywhere.
        start: the global flat index of element 0 when the arguments are a segment-aligned shard
            `[start, start + D)` of a longer flat model (`offsets` then local to the shard): its noise is drawn
            at the global indices, so the result is that slice of the whole model's merge.
        temperature: Concrete temperature T.
        mask: "relaxed" (training), "hard" (Bernoulli sample), "threshold" (logits > 0) or "none".
        rescale: divide the mask by its mean over each segment.
        backend: "auto", "triton", "cpp" or "reference".

    Returns:
        fp32 `[D]` (fp64 only with fp64 logits on the reference backend).
    """
    if isinstance(task_vectors, LoraFactors):
        if start:
            raise ValueError(f"start={start}: a shard of factored LoRA task vectors is not supported; use start=0")
        from .lora_concrete_merge import lora_concrete_merge  # it builds on this module

        return lora_concrete_merge(
            base, task_vectors, logits, weights, offsets, seed=seed, step=step, temperature=temperature, mask=mask,
            rescale=rescale, backend=backend,
        )
    _check_scalars(seed, step, temperature, mask)
    name, offsets = _validate(base, task_vectors, logits, weights, offsets, backend)
    _check_start(start, logits.numel())
    out, _ = _merge_op(
        base.contiguous(),
        task_vectors.contiguous(),
        logits.contiguous(),
        layerwise_weights(weights, offsets.numel() - 1, logits.dtype),
        offsets,
        _to_i64(seed),
        step,
        start,
        float(temperature),
        mask,
        bool(rescale),
        name,
    )
    return out


def sample_concrete_mask(
    logits: torch.Tensor,
    *,
    seed: int,
    step: int = 0,
    temperature: float = DEFAULT_TEMPERATURE,
    mask: str = "relaxed",
    start: int = 0,
    backend: str = "auto",
) -> torch.Tensor:
    """Exactly the mask `m` (before rescaling) that `concrete_merge` applies for the same arguments.

    With `start`, `logits` are the elements [start, start + D) of a longer flat model (a chunk of a model
    merged piece by piece, or a rank's shard): their noise is drawn at those global indices, which gives
    the whole-model mask's slice, and exactly what `concrete_merge` with the same `start` applies.
    """
    _check_scalars(seed, step, temperature, mask)
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    name = backends.resolve(backend, logits.device)
    _check_logits(logits, backends.BACKENDS[name].compute_dtypes)
    _check_start(start, logits.numel())
    whole = torch.tensor([0, logits.numel()], dtype=torch.int64, device=logits.device)
    m = torch.empty_like(logits)
    with nvtx_range("concrete_merge.sample_mask"):
        backends.phases(name).mask_sums(
            logits.contiguous(), whole, seed, step, float(temperature), MODES.index(mask), m, start
        )
    return m


def sample_uniform(
    count: int, *, seed: int, step: int = 0, start: int = 0, device: torch.device | str = "cpu", backend: str = "auto"
) -> torch.Tensor:
    """The Concrete noise u_j for flat indices j in [start, start + count): the stream every mask draws from.

    Methods that need reproducible randomness indexed by flat position (DARE's drops) use it, so their
    results do not depend on chunking or threads.
    """
    _check_scalars(seed, step, 0.5, "relaxed")
    if isinstance(start, bool) or not isinstance(start, int) or start < 0 or count < 0 or start + count > 2**63:
        raise ValueError(f"need 0 <= start and start + count <= 2^63, got start={start!r}, count={count!r}")
    device = torch.device(device)
    name = backends.resolve(backend, device)
    with nvtx_range("concrete_merge.sample_uniform"):
        return backends.phases(name).uniform(seed, step, start, count).to(device)
