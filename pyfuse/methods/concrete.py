"""Concrete merging with a given mask: `out_j = b_j + r_j * scaling * sum_i w_i tau_ij` (docs/concrete-merge.md).

The mask logits come from a file or tensors: one tensor per parameter, named and shaped like it, or one
flat tensor named "logits" of length D, in the engine's layout order (the base's floating tensors sorted
by name). The mask `m` is drawn by the op (`pyfuse.ops.sample_concrete_mask`, on the fastest backend) as
`pyfuse.ops.concrete_merge` draws it for that flat model (up to rounding): the noise is indexed by the
global flat position, so a model merged tensor by tensor (or streamed chunk by
chunk) gets the same mask as one merged in one flat buffer. `r = m / mean(m over the tensor)` with `rescale`;
a tensor whose mask is all zero stays at the base.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch

from ..io.sources import TensorSource, open_source
from ..ops import MODES, sample_concrete_mask
from .base import (
    TEMPERATURE,
    WEIGHTS,
    Chunk,
    MergeContext,
    Param,
    StaticMethod,
    boolean,
    choice,
    integer,
    number,
    register,
)

FLAT_KEY = "logits"
_CHUNK = 1 << 20  # elements of logits read at a time when summing a tensor's mask


def _logits_input(value: Any) -> Any:
    if not isinstance(value, (str, os.PathLike, torch.Tensor, Mapping, TensorSource)):
        raise TypeError(f"must be a path to a safetensors file, a tensor or a dict of tensors, got "
                        f"{type(value).__name__}")
    return value


@register
class Concrete(StaticMethod):
    """Task arithmetic under a Concrete mask learned elsewhere (e.g. by Concrete TA / AdaMerging)."""

    name = "concrete"
    fused = True
    display_name = "Concrete mask"
    reference = "Tang et al., 2023, Concrete Subspace Learning for Multi-task Model Fusion"
    summary = "task arithmetic under a given Concrete mask (logits file) and mask mode"
    params = {
        "logits": Param(None, _logits_input, "mask logits: a safetensors file, a flat [D] tensor or a dict",
                        path=True),
        "mask": Param("relaxed", choice(*MODES), "relaxed | hard | threshold | none"),
        "temperature": TEMPERATURE,
        "seed": Param(0, integer(0, 2**64), "Philox key of the mask noise"),
        "step": Param(0, integer(0, 2**32), "Philox step of the mask noise"),
        "rescale": Param(True, boolean, "divide the mask by its mean over each tensor"),
        "scaling": Param(0.3, number(), "lambda, the factor on the summed task vectors"),
        "weights": WEIGHTS,
    }
    temporaries = (1, 4)

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        if self.parameters["logits"] is None and self.parameters["mask"] != "none":
            raise ValueError(f"concrete: parameter 'logits' is required with mask={self.parameters['mask']!r}")

    def bind(self, layout, n) -> None:
        super().bind(layout, n)
        self._layout = layout
        self._coefficients = self.parameters["scaling"] * self.weights
        logits = self.parameters["logits"]
        self._source: TensorSource | None = None
        self._flat = False  # one flat "logits" tensor rather than one per parameter
        if logits is None:
            return
        if isinstance(logits, torch.Tensor):
            logits = {FLAT_KEY: logits}
        source = open_source(logits, f"mask logits ({logits})" if isinstance(logits, (str, os.PathLike)) else
                             "mask logits")
        if source.keys() == [FLAT_KEY] and len(source.shape(FLAT_KEY)) == 1:
            if source.shape(FLAT_KEY)[0] != layout.numel:
                raise ValueError(f"{source.label}: flat tensor {FLAT_KEY!r} has {source.shape(FLAT_KEY)[0]} "
                                 f"entries, expected D = {layout.numel} (the base's floating parameters)")
            if not source.dtype(FLAT_KEY).is_floating_point:
                raise TypeError(f"{source.label}: {FLAT_KEY!r} is {source.dtype(FLAT_KEY)}, expected floating")
            self._flat = True
        else:
            layout.check(source)
        self._source = source

    def coefficients(self) -> torch.Tensor:
        """`scaling * weights`, the coefficient of each task vector."""
        return self._coefficients

    def fused_mask(self, device: torch.device, numel: int) -> tuple[torch.Tensor, dict[str, Any]]:
        p = self.parameters
        return self.flat_logits(device), {"seed": p["seed"], "step": p["step"], "temperature": p["temperature"],
                                          "mask": p["mask"], "rescale": p["rescale"]}

    def flat_logits(self, device: torch.device) -> torch.Tensor:
        """The logits of the whole layout, fp32 `[D]` (ones without logits: mask "none" ignores them)."""
        return torch.cat([self._logits(s, 0, shape.numel(), device) for s, shape in enumerate(self._layout.shapes)])

    def _logits(self, index: int, lo: int, hi: int, device: torch.device) -> torch.Tensor:
        """Logits of elements [lo, hi) of tensor `index`, fp32 on `device`; ones where there are none."""
        if self._source is None:
            return torch.ones(hi - lo, device=device)  # mask "none" ignores them
        if self._flat:
            offset = int(self._layout.offsets[index])
            x = self._source.get(FLAT_KEY)[offset + lo: offset + hi]
        else:
            x = self._source.get(self._layout.names[index]).reshape(-1)[lo:hi]
        x = x.to(device=device, dtype=torch.float32)
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"mask logits of {self._layout.names[index]!r} are not all finite")
        return x

    def _mask(self, index: int, lo: int, hi: int, device: torch.device) -> torch.Tensor:
        p = self.parameters
        start = int(self._layout.offsets[index]) + lo
        return sample_concrete_mask(self._logits(index, lo, hi, device), seed=p["seed"], step=p["step"],
                                    temperature=p["temperature"], mask=p["mask"], start=start)

    def plan(self, ctx: MergeContext, index: int) -> float:
        """1 / mean of the tensor's mask (1 without rescaling, 0 for an all-zero mask)."""
        if not self.parameters["rescale"]:
            return 1.0
        numel = self._layout.shapes[index].numel()
        total = 0.0
        for lo in range(0, numel, _CHUNK):
            total += float(self._mask(index, lo, min(lo + _CHUNK, numel), ctx.device).sum(dtype=torch.float64))
        return numel / total if total > 0 else 0.0

    def merge_chunk(self, chunk: Chunk, plan: float) -> torch.Tensor:
        lo = chunk.start - int(self._layout.offsets[chunk.index])
        r = self._mask(chunk.index, lo, lo + len(chunk), chunk.base.device).mul_(plan)
        combined = self._coefficients.to(chunk.deltas.device) @ chunk.deltas
        return chunk.base + r * combined
