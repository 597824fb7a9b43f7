"""Merges in the singular subspaces of each weight matrix (fusion_bench's TSV-M, Iso-C, Iso-CTS), and the
per-matrix machinery they share with WUDI.

`PerMatrix` methods merge every 2-D tensor not listed in `exclude_keys` as a whole: `plan` reads the
matrix's task vectors (one pass over that tensor, so memory holds one matrix per model, never the model)
and `merge_matrix` returns its merged task vector in float64; chunks then take their slice of it. Every
other tensor (biases, norms, conv kernels, scalars; 2-D ones in `exclude_keys`) gets the mean task
vector, as in the references. The result is `base + scaling * merged`.

With `T` task vectors `tau_i` of a matrix (`[m, p]`, `k = min(m, p)`):

- `tsv` (Gargiulo et al., TSV-M): each `tau_i = U_i S_i V_i^T` keeps its top `r = int(k * (1/T))` singular
  triplets (the reference's float product: `r = 0` when `T > k`, and the matrix's merged task vector is 0);
  they are placed side by side in `U = [U_1[:, :r], ...]`, `S`, `V` (zero beyond `T r`), `U` and `V` are
  replaced by their nearest orthonormal factors (`u vh` from their SVDs) and the merge is `U S V^T`.
- `iso_c` (Marczak et al.): `sum_i tau_i = U S V^T`, merged as `U (mean S) V^T`: every singular value flattened
  to their mean.
- `iso_cts`: the sum's top `c` singular vectors form a common subspace, with
  `c = k - round((k - int(k * common_space_fraction)) / T) * T` (Python's round: ties to even), so the rest
  splits evenly into `(k - c) / T` directions per task, taken from the SVD of each `tau_i` with the common
  subspace projected out of its columns. Task and common directions are stacked, orthonormalised like TSV's,
  and every singular value set to the mean of the stacked ones.

Matrices are decomposed in float64; where a stack of singular vectors is rank deficient (zero task vectors,
`T r < k`) the orthonormal factor is not unique, but only in directions whose singular values are 0, which
then do not reach the result.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from .base import (
    WEIGHTS,
    Chunk,
    MergeContext,
    Param,
    StaticMethod,
    check_names,
    number,
    numbers,
    register,
    tensor_names,
)

EXCLUDE_KEYS = Param((), tensor_names, "matrices merged by the mean task vector instead")


def orthonormal_factor(a: torch.Tensor) -> torch.Tensor:
    """The nearest matrix with orthonormal columns (or rows) to `a`: `u vh` of its thin SVD."""
    u, _, vh = torch.linalg.svd(a, full_matrices=False)
    return u @ vh


class PerMatrix(StaticMethod):
    """A merge computed matrix by matrix in float64; other tensors take the mean task vector (module docstring)."""

    #: float64 copies of one matrix `merge_matrix` holds at once, per task and in all; for predictions
    per_task_copies: ClassVar[int] = 1
    matrix_copies: ClassVar[int] = 6

    def bind(self, layout, n) -> None:
        super().bind(layout, n)
        check_names(self.name, "exclude_keys", self.parameters["exclude_keys"], layout)
        self._scaling = self.parameters.get("scaling", 1.0)
        self._mean = self._scaling * self.weights / n

    def tensor_passes(self) -> int:
        return 1

    def is_matrix(self, layout, index: int) -> bool:
        return len(layout.shapes[index]) == 2 and layout.names[index] not in self.parameters["exclude_keys"]

    def merge_matrix(self, tau: torch.Tensor) -> torch.Tensor:
        """The merged task vector `[m, p]` of task vectors `tau` `[T, m, p]` (float64, weighted)."""
        raise NotImplementedError

    def plan(self, ctx: MergeContext, index: int) -> tuple[int, torch.Tensor] | None:
        if not self.is_matrix(ctx.layout, index):
            return None
        shape = ctx.layout.shapes[index]
        tau = torch.empty(ctx.n, shape.numel(), dtype=torch.float64)
        lo = 0
        for part in ctx.map(lambda chunk: chunk.deltas.to("cpu", copy=True), index):
            tau[:, lo: lo + part.shape[1]] = part
            lo += part.shape[1]
        tau = tau.view(ctx.n, *shape).mul_(self.weights.double()[:, None, None])
        threads = torch.get_num_threads()
        torch.set_num_threads(ctx.threads)
        try:
            merged = self.merge_matrix(tau).mul_(self._scaling)
        finally:
            torch.set_num_threads(threads)
        return int(ctx.layout.offsets[index]), merged.reshape(-1).float()

    def merge_chunk(self, chunk: Chunk, plan: tuple[int, torch.Tensor] | None) -> torch.Tensor:
        if plan is None:
            return torch.addmv(chunk.base, chunk.deltas.T, self._mean.to(chunk.base.device))
        offset, merged = plan
        lo = chunk.start - offset
        return chunk.base + merged[lo: lo + len(chunk)].to(chunk.base.device)

    def state_bytes(self, layout, n, in_flight) -> int:
        largest = max((shape.numel() for index, shape in enumerate(layout.shapes) if self.is_matrix(layout, index)),
                      default=0)
        return largest * (8 * n * self.per_task_copies + 8 * self.matrix_copies + 4)


def stacked_merge(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor) -> torch.Tensor:
    """`U' diag(s) V'` with `U'`, `V'` the orthonormal factors of the stacked singular vectors `u`, `vh`."""
    return (orthonormal_factor(u) * s) @ orthonormal_factor(vh)


def tsv_factors(tau: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """TSV-M's decorrelated factors of task vectors `tau` `[T, m, p]`: `U'` `[m, k]`, `s` `[k]`, `V'` `[k, p]` and
    the rank `r`, task i's triplets being columns (entries, rows) `[i r, (i + 1) r)` (module docstring)."""
    tasks, m, p = tau.shape
    k = min(m, p)
    rank = int(k * (1 / tasks))  # as the reference computes it, float product and all
    u, s, vh = torch.linalg.svd(tau, full_matrices=False)
    stacked_u = torch.zeros(m, k, dtype=tau.dtype)
    stacked_s = torch.zeros(k, dtype=tau.dtype)
    stacked_vh = torch.zeros(k, p, dtype=tau.dtype)
    for i in range(tasks):
        block = slice(i * rank, (i + 1) * rank)
        stacked_u[:, block] = u[i, :, :rank]
        stacked_s[block] = s[i, :rank]
        stacked_vh[block] = vh[i, :rank]
    return orthonormal_factor(stacked_u), stacked_s, orthonormal_factor(stacked_vh), rank


def task_singular_parts(tau: torch.Tensor) -> torch.Tensor:
    """Each task's own part of the TSV-M merge of `tau` `[T, m, p]`: `U'_i diag(s_i) V'_i` over its block of the
    decorrelated factors, `[T, m, p]`; they sum to the merge (fusion_bench's `return_single_task_models`)."""
    u, s, vh, rank = tsv_factors(tau)
    return torch.stack([(u[:, i * rank: (i + 1) * rank] * s[i * rank: (i + 1) * rank]) @ vh[i * rank: (i + 1) * rank]
                        for i in range(len(tau))])


def _alpha(value: object) -> float | tuple[float, ...]:
    if isinstance(value, (list, tuple, torch.Tensor)):
        return numbers(value)
    return number()(value)


@register
class TaskSingularVectors(PerMatrix):
    """TSV-M: each task's top `1/T` singular triplets per matrix, orthonormalised together (module docstring)."""

    name = "tsv"
    display_name = "TSV-M"
    reference = "Gargiulo et al., 2025, Task Singular Vectors"
    summary = "Task Singular Vectors (TSV-M): top 1/T singular vectors of each task, orthonormalised, per matrix"
    params = {
        "scaling": Param(1.0, number(), "factor on the merged task vector (fusion_bench's scalar `alpha`)"),
        "weights": Param(None, WEIGHTS.check, "per-model factors on the task vectors before the SVDs "
                                              "(fusion_bench's list `alpha`); default all 1"),
        "alpha": Param(None, _alpha, "fusion_bench's `alpha`: a number acts as `scaling`, a list (one factor per "
                                     "fine-tuned model, applied before the SVDs) as `weights`; not with either"),
        "exclude_keys": EXCLUDE_KEYS,
    }
    per_task_copies = 2  # the task vectors and their singular vectors

    def __init__(self, **params) -> None:
        super().__init__(**params)
        c = self.parameters
        if c["alpha"] is not None and (c["weights"] is not None or c["scaling"] != 1.0):
            raise ValueError(f"{self.name}: alpha is fusion_bench's name for scaling (a number) or weights (a list); "
                             "give alpha or those, not both")

    def bind(self, layout, n) -> None:
        alpha = self.parameters["alpha"]
        if isinstance(alpha, tuple) and len(alpha) != n:
            raise ValueError(f"{self.name}: alpha has {len(alpha)} entries, expected one per fine-tuned model ({n})")
        super().bind(layout, n)
        if isinstance(alpha, tuple):
            self.weights = torch.tensor(alpha, dtype=torch.float32)
        elif alpha is not None:
            self._scaling = alpha
        self._mean = self._scaling * self.weights / n

    def merge_matrix(self, tau: torch.Tensor) -> torch.Tensor:
        u, s, vh, _ = tsv_factors(tau)
        return (u * s) @ vh


@register
class IsoC(PerMatrix):
    """Iso-C: the summed task vector with its singular values flattened to their mean, per matrix."""

    name = "iso_c"
    display_name = "Iso-C"
    reference = "Marczak et al., 2025, No Task Left Behind: Isotropic Model Merging"
    summary = "Iso-C: per matrix, the summed task vector with every singular value set to their mean"
    params = {
        "scaling": Param(1.0, number(), "factor on the merged task vector (fusion_bench's `scaling_factor`)"),
        "exclude_keys": EXCLUDE_KEYS,
    }
    matrix_copies = 4

    def merge_matrix(self, tau: torch.Tensor) -> torch.Tensor:
        u, s, vh = torch.linalg.svd(tau.sum(0), full_matrices=False)
        return (u * s.mean()) @ vh


def common_space_size(k: int, fraction: float, tasks: int) -> int:
    """Iso-CTS's common subspace dimension: the rest splits evenly into the tasks (the reference's rounding)."""
    common = int(k * fraction)
    return k - round((k - common) / tasks) * tasks


@register
class IsoCTS(PerMatrix):
    """Iso-CTS: a common subspace of the summed task vectors plus per-task directions, isotropic (docstring)."""

    name = "iso_cts"
    display_name = "Iso-CTS"
    reference = "Marczak et al., 2025, No Task Left Behind: Isotropic Model Merging"
    summary = "Iso-CTS: common subspace of the sum plus each task's own directions, singular values flattened"
    params = {
        "scaling": Param(1.0, number(), "factor on the merged task vector (fusion_bench's `scaling_factor`)"),
        "common_space_fraction": Param(0.8, number(0, 1), "share of the directions given to the common subspace"),
        "exclude_keys": EXCLUDE_KEYS,
    }
    per_task_copies = 3  # the task vectors, their task-specific parts and those parts' singular vectors
    matrix_copies = 8

    def bind(self, layout, n) -> None:
        super().bind(layout, n)
        fraction = self.parameters["common_space_fraction"]
        for index, (name, shape) in enumerate(zip(layout.names, layout.shapes)):
            if self.is_matrix(layout, index) and common_space_size(min(shape), fraction, n) < 0:
                raise ValueError(
                    f"{self.name}: matrix {name!r} ({list(shape)}) leaves {min(shape) - int(min(shape) * fraction)} "
                    f"directions for {n} tasks, which rounds to more than it has; raise common_space_fraction or "
                    f"list it in exclude_keys")

    def merge_matrix(self, tau: torch.Tensor) -> torch.Tensor:
        tasks, m, p = tau.shape
        k = min(m, p)
        common = common_space_size(k, self.parameters["common_space_fraction"], tasks)
        per_task = (k - common) // tasks
        u, s, vh = torch.linalg.svd(tau.sum(0), full_matrices=False)
        common_u = u[:, :common]
        specific = tau - common_u @ (common_u.T @ tau)
        task_u, task_s, task_vh = torch.linalg.svd(specific, full_matrices=False)
        stacked_u = torch.cat([*task_u[:, :, :per_task], common_u], dim=1)
        stacked_s = torch.cat([*task_s[:, :per_task], s[:common]])
        stacked_vh = torch.cat([*task_vh[:, :per_task], vh[:common]], dim=0)
        return stacked_merge(stacked_u, torch.full_like(stacked_s, float(stacked_s.mean())), stacked_vh)
