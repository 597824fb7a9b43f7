"""RegMean (Jin et al.): per Linear layer, the weight that best reproduces every model's outputs on its inputs.

For a Linear weight `W` (`[out, in]`) with input Grams `G_i` (`X_i^T X_i / rows`), RegMean minimises
`sum_i w_i ||X~_i W^T - X~_i W_i^T||^2`, whose closed form is

    W^T = (sum_i w_i G~_i)^-1 sum_i w_i G~_i W_i^T,    G~ = alpha * G + (1 - alpha) * diag(G)

(`alpha` scales the off-diagonal entries: RegMean's `reduce_non_diagonal_ratio`, MaTS' `l`; 0.9 as RegMean's
authors use for transformers; 1 is the plain least-squares merge). It is solved for the deviation from the
weighted average, by Cholesky in float64 (float32 past `FLOAT64_MAX_FEATURES` inputs); a singular system (e.g.
an input feature no task ever activates, with alpha = 1) falls back to the least-norm solution, which keeps
the average along the directions the data does not determine. The solve runs where the weights are (a GPU
for a merge with `device="cuda"`). Conv1D weights (stored `[in, out]`) are `W^T`
already. Biases, embeddings, norms and every weight without a Gram are averaged.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from ..layout import FlatLayout
from ..stats import Statistics
from .base import WEIGHTS, Param, number, register
from .data_aware import DataMethod

FLOAT64_MAX_FEATURES = 8192  # [in, in] float64 systems up to 512 MiB each


def regularize_gram(gram: torch.Tensor, strength: float) -> torch.Tensor:
    """`l*G + (1-l)*diag(G)`: off-diagonal entries shrunk by `l` (1 keeps G, 0 keeps only its diagonal)."""
    return strength * gram + (1.0 - strength) * torch.diag_embed(torch.diagonal(gram))


def regression_mean(weights_of_models: Sequence[torch.Tensor], grams: Iterable[torch.Tensor],
                    coefficients: Sequence[float], alpha: float, transposed: bool = False) -> torch.Tensor:
    """RegMean's merge of one Linear weight (see the module docstring), shaped like the inputs.

    `weights_of_models`: each model's weight, `[out, in]` (`[in, out]` if `transposed`); `grams`: each model's
    input Gram `[in, in]`, read one at a time; `coefficients`: the models' weights, summing to 1.
    """
    first = weights_of_models[0]
    in_features = first.shape[0] if transposed else first.shape[1]
    dtype = torch.float64 if in_features <= FLOAT64_MAX_FEATURES else torch.float32
    targets = [(theta if transposed else theta.T).to(dtype) for theta in weights_of_models]  # W_i^T, [in, out]
    average = sum(w * t for w, t in zip(coefficients, targets))
    lhs = torch.zeros(in_features, in_features, dtype=dtype, device=first.device)
    rhs = torch.zeros_like(average)
    for w, t, gram in zip(coefficients, targets, grams):
        gram = regularize_gram(gram.to(dtype), alpha)
        lhs += w * gram
        rhs += w * (gram @ (t - average))
    factor, info = torch.linalg.cholesky_ex(lhs)
    if int(info) == 0:
        deviation = torch.cholesky_solve(rhs, factor)
    else:
        deviation = least_norm_solve(lhs, rhs)
    merged = average + deviation
    return merged if transposed else merged.T


def least_norm_solve(lhs: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """The least-norm solution of `lhs @ x = rhs` for a symmetric positive semi-definite, possibly singular `lhs`,
    on `lhs`'s device: by SVD (LAPACK's gelsd) on the CPU; elsewhere by the eigendecomposition's pseudo-inverse,
    since CUDA's `lstsq` has only a full-rank driver. Both drop the directions below `eps * size` of the largest."""
    if lhs.device.type == "cpu":
        return torch.linalg.lstsq(lhs, rhs, driver="gelsd").solution
    return torch.linalg.pinv(lhs, hermitian=True) @ rhs


@register
class RegMean(DataMethod):
    """Regression mean of every Linear weight with input Grams; other parameters averaged."""

    name = "regmean"
    display_name = "RegMean"
    reference = "Jin et al., 2023, Dataless Knowledge Fusion by Merging Weights of Language Models"
    summary = "closed-form regression mean of Linear weights (needs 'gram_in' statistics)"
    needs = ("gram_in",)
    params = {
        "alpha": Param(0.9, number(0, 1), "scale of the Grams' off-diagonal entries: alpha*G + (1-alpha)*diag(G)"),
        "weights": WEIGHTS,
    }

    def merge_parameter(self, name: str, base: torch.Tensor, finetuned: list[torch.Tensor],
                        stats: Sequence[Statistics]) -> torch.Tensor | None:
        if stats[0].shape("gram_in", name) is None:
            return None
        transposed = name in stats[0].transposed
        grams = (st.get("gram_in", name) for st in stats)
        return regression_mean(finetuned, grams, (self.weights / self.weights.sum()).tolist(), self.parameters["alpha"],
                               transposed)

    def working_bytes(self, layout: FlatLayout, n: int) -> int:
        features = max((max(shape) for shape in layout.shapes if len(shape) == 2), default=0)
        return super().working_bytes(layout, n) + 3 * 8 * features * features
