"""`concrete_merge`: sample the Concrete mask, apply and rescale it, and sum the weighted task vectors.

    out_j = base_j + r_j * sum_i w[i, seg(j)] * tv[i, j],   r_j = m_j / mean_{k in seg(j)} m_k

Registered once with `torch.library` (forward and fused backward are both ops, so autograd and
`torch.compile` see one op each); the backend named by `backend=` (or picked by device for "auto")
runs the phases documented in `pyfuse.ops.reference`. A segment whose mask is all zero (possible with
hard or threshold masks) has nothing to rescale: its elements stay at the base value.
"""

from __future__ import annotations

import torch

from . import backends
from .factors import LoraFactors
from .lora_concrete_merge import lora_concrete_merge
from .masked_merge import (
    DEFAULT_TEMPERATURE,
    check_logits,
    check_scalars,
    check_start,
    layerwise_weights,
    masked_backward,  # noqa: F401  (importable from here as before)
    masked_forward,  # noqa: F401
    register_merge_op,
    to_i64,
    validate_merge,
)
from .profiling import nvtx_range
from .reference import MODES

__all__ = ["DEFAULT_TEMPERATURE", "MODES", "concrete_merge", "sample_concrete_mask", "sample_uniform"]


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
# The registered op (`pyfuse::concrete_merge` and its backward). Seeds travel as signed 64-bit words.
# ---------------------------------------------------------------------------------------------
def _apply(phases, tensors):
    def apply(seg_scale, out):
        phases.merge_apply(tensors["base"], tensors["task_vectors"], tensors["weights"], tensors["offsets"], seg_scale,
                           out)

    return apply


def _accumulate(phases, grad_out, tensors, step, temperature, start, need_logits, need_weights):
    def accumulate(seg_scale, seed_u64, mode_id, ga_out):
        return phases.backward_accumulate(
            grad_out, tensors["task_vectors"], tensors["logits"], tensors["weights"], tensors["offsets"], seg_scale,
            seed_u64, step, temperature, mode_id, ga_out, start,
        )

    return accumulate


_merge_op = register_merge_op("concrete_merge", ("base", "task_vectors", "logits", "weights", "offsets"),
                              ("task_vectors", "logits", "weights", "offsets"), _apply, _accumulate)


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------
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
        return lora_concrete_merge(
            base, task_vectors, logits, weights, offsets, seed=seed, step=step, start=start, temperature=temperature,
            mask=mask, rescale=rescale, backend=backend,
        )
    check_scalars(seed, step, temperature, mask)
    name, offsets = _validate(base, task_vectors, logits, weights, offsets, backend)
    check_start(start, logits.numel())
    out, _ = _merge_op(
        base.contiguous(),
        task_vectors.contiguous(),
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
    check_scalars(seed, step, temperature, mask)
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    name = backends.resolve(backend, logits.device)
    check_logits(logits, backends.BACKENDS[name].compute_dtypes)
    check_start(start, logits.numel())
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
    check_scalars(seed, step, DEFAULT_TEMPERATURE, "relaxed")
    if isinstance(start, bool) or not isinstance(start, int) or start < 0 or count < 0 or start + count > 2**63:
        raise ValueError(f"need 0 <= start and start + count <= 2^63, got start={start!r}, count={count!r}")
    device = torch.device(device)
    name = backends.resolve(backend, device)
    with nvtx_range("concrete_merge.sample_uniform"):
        return backends.phases(name).uniform(seed, step, start, count).to(device)
