"""Spherical interpolation of two models: SLERP (fusion_bench's and mergekit's) and mergekit's NuSLERP.

`slerp` interpolates the two fine-tuned models' weights `v0`, `v1` tensor by tensor, each tensor one
vector (as both references do for every tensor: matrices, biases, norms, embeddings). With `n_k` the norm of
`v_k`, divided by only where it exceeds `epsilon`, `d = <v0/n0, v1/n1>`: if `|d| > DOT_THRESHOLD` the
result is the linear `(1-t) v0 + t v1`, else, with `theta = acos(d)`,
`sin(theta - t theta)/sin(theta) v0 + sin(t theta)/sin(theta) v1`. `t=0` gives the first model. The base
model is not used (mergekit's form, base model `A` and model `B`, is `finetuned=[A, B]`).

`nuslerp` (mergekit) interpolates task vectors (`task_vectors=True`, mergekit with a `base_model`: the
result is `base + nuslerp(d0, d1)`) or the weights themselves (mergekit without one), with
`t = w1 / (w0 + w1)` from the per-model `weights` (0.5 when they sum to less than 1e-6 in magnitude),
the whole tensor as one vector (`nuslerp_flatten`) or per row (`nuslerp_row_wise`: along the first dimension
instead of the last): norms clamped at 1e-7, `theta = acos(clamp(cos, -1, 1))`, linear where
`|sin theta| < 1e-8`, else `(sin((1-t) theta) v0 + sin(t theta) v1) / sin theta`.

Norms and dot products are float64 sums over the tensor (one pass, `geometry.segment_grams`), so
the result does not depend on chunking; the interpolation itself runs chunk by chunk. For opposite vectors
NuSLERP's choice between the linear formula and the spherical limit (which differ unless t = 0.5) depends,
in the reference as here, on how `cos = -1` rounds.
"""

from __future__ import annotations

import math

import torch

from .base import WEIGHTS, Chunk, MergeContext, Param, StaticMethod, boolean, number, register
from .geometry import CoefficientPlan, segment_grams


class _Interpolation(StaticMethod):
    """Two vectors per tensor (`_vectors` of a chunk), combined by per-vector coefficients from their Gram."""

    temporaries = (2, 3)
    #: interpolate the fine-tuned weights (True) or the task vectors, adding the base after (False)
    of_weights = True

    def bind(self, layout, n) -> None:
        super().bind(layout, n)
        if n != 2:
            raise ValueError(f"{self.name}: interpolates exactly two fine-tuned models, got {n}")

    def tensor_passes(self) -> int:
        return 1

    def _along(self, shape: torch.Size) -> str:
        return "all"

    def _vectors(self, chunk: Chunk) -> torch.Tensor:
        """The two vectors' entries in the chunk, `[2, c]` (a new tensor)."""
        return chunk.deltas + chunk.base if self.of_weights else chunk.deltas.clone()

    def _coefficients(self, gram: torch.Tensor) -> torch.Tensor:
        """float64 `[V, 2]` coefficients of the two vectors, from their Grams `[V, 2, 2]`."""
        raise NotImplementedError

    def plan(self, ctx: MergeContext, index: int) -> CoefficientPlan:
        shape = ctx.layout.shapes[index]
        along = self._along(shape)
        gram = segment_grams(ctx, index, along, self._vectors)
        return CoefficientPlan(shape, along, int(ctx.layout.offsets[index]), self._coefficients(gram).float())

    def merge_chunk(self, chunk: Chunk, plan: CoefficientPlan) -> torch.Tensor:
        merged = self._vectors(chunk).mul_(plan.for_chunk(chunk)).sum(0)
        return merged if self.of_weights else merged.add_(chunk.base)


@register
class Slerp(_Interpolation):
    """SLERP of two models, tensor by tensor (fusion_bench's `SlerpMergeAlgorithm`, mergekit's `slerp`)."""

    name = "slerp"
    display_name = "SLERP"
    reference = "fusion_bench's and mergekit's slerp (Shoemake, 1985, Animating Rotation with Quaternion Curves)"
    summary = "spherical interpolation between the two fine-tuned models, per tensor (t=0: the first)"
    params = {
        "t": Param(0.5, number(), "interpolation factor: 0 gives the first model, 1 the second"),
        "DOT_THRESHOLD": Param(0.9995, number(0, 1),
                               "above this |cosine| the two tensors count as colinear: linear interpolation"),
        "epsilon": Param(1e-8, number(0), "a tensor is normalised only where its norm exceeds this"),
    }

    def _coefficients(self, gram: torch.Tensor) -> torch.Tensor:
        t, eps = self.parameters["t"], self.parameters["epsilon"]
        rows = []
        for g in gram.tolist():
            norms = [math.sqrt(g[0][0]), math.sqrt(g[1][1])]
            scale = [norm if norm > eps else 1.0 for norm in norms]
            dot = g[0][1] / (scale[0] * scale[1])
            if abs(dot) > self.parameters["DOT_THRESHOLD"]:
                rows.append([1 - t, t])
                continue
            theta = math.acos(dot)
            sin_theta = math.sin(theta)
            theta_t = theta * t
            rows.append([math.sin(theta - theta_t) / sin_theta, math.sin(theta_t) / sin_theta])
        return torch.tensor(rows, dtype=torch.float64)


@register
class NuSlerp(_Interpolation):
    """mergekit's NuSLERP: SLERP of task vectors (or weights), per tensor or per row, `t` from model weights."""

    name = "nuslerp"
    display_name = "NuSLERP"
    reference = "mergekit's nuslerp (Goddard et al., 2024, Arcee's MergeKit)"
    summary = "mergekit's NuSLERP: spherical interpolation of two task vectors (or models), t = w1 / (w0 + w1)"
    params = {
        "weights": Param(None, WEIGHTS.check, "per-model weights (mergekit's per-model `weight`); "
                                              "t = w1 / (w0 + w1) (default: equal, t = 0.5)"),
        "nuslerp_flatten": Param(True, boolean, "interpolate each tensor as one vector"),
        "nuslerp_row_wise": Param(False, boolean, "without flattening: vectors along the first dimension "
                                                  "(columns of a matrix) instead of the last (rows)"),
        "task_vectors": Param(True, boolean, "interpolate task vectors and add the base (mergekit with a "
                                             "base_model); false: the fine-tuned weights (without one)"),
    }
    _EPS = 1e-8  # below this |sin theta|, vectors are colinear
    _NORM_FLOOR = 1e-7

    def bind(self, layout, n) -> None:
        super().bind(layout, n)
        w0, w1 = self.weights.double().tolist()
        self.t = 0.5 if abs(w0 + w1) < 1e-6 else w1 / (w0 + w1)
        self.of_weights = not self.parameters["task_vectors"]

    def _along(self, shape: torch.Size) -> str:
        if self.parameters["nuslerp_flatten"]:
            return "all"
        return "columns" if self.parameters["nuslerp_row_wise"] else "rows"

    def _coefficients(self, gram: torch.Tensor) -> torch.Tensor:
        t = self.t
        norms = torch.diagonal(gram, dim1=1, dim2=2).sqrt().clamp(min=self._NORM_FLOOR)
        cos = gram[:, 0, 1] / (norms[:, 0] * norms[:, 1])
        theta = torch.acos(cos.clamp(-1, 1))
        sin_theta = torch.sin(theta)
        spherical = torch.stack([torch.sin((1 - t) * theta), torch.sin(t * theta)], dim=1) / sin_theta[:, None]
        linear = torch.tensor([1 - t, t], dtype=torch.float64).expand_as(spherical)
        return torch.where((sin_theta.abs() < self._EPS)[:, None], linear, spherical)

