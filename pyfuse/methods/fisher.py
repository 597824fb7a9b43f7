"""Fisher merging (Matena & Raffel): a per-entry average of the models weighted by their diagonal Fishers.

Per parameter with Fisher statistics, `theta = sum_i c_i (F_i + eps) theta_i / sum_i c_i (F_i + eps)`, where
`c_i = w_i / N_i`: `w` the per-model weights and `N_i` the model's normalisation constant:

- "none": `N_i = 1`, the Fishers as collected (means over examples);
- "l2": `N_i = ||F_i||_2` over all of the model's Fisher entries (the normalisation MergeLM and fusion_bench
  offer as `normalize_fisher_weight`), so that no task dominates by the scale of its gradients;
- "sum": `N_i = sum(F_i)`, the model's total Fisher mass.

`eps` (their `minimal_fisher_weight`) keeps the ratio defined: where every Fisher vanishes the result is the
`c`-weighted average. Parameters without Fisher statistics are averaged with the weights `w`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ..stats import Statistics
from .base import WEIGHTS, Param, choice, number, register
from .data_aware import DataMethod


@register
class Fisher(DataMethod):
    """Diagonal-Fisher weighted average of the fine-tuned models (see the module docstring)."""

    name = "fisher"
    display_name = "Fisher"
    reference = "Matena & Raffel, 2022, Merging Models with Fisher-Weighted Averaging"
    summary = "diagonal-Fisher weighted average (needs 'fisher' statistics)"
    needs = ("fisher",)
    params = {
        "normalize": Param("none", choice("none", "l2", "sum"),
                           "per-model Fisher scaling: none | l2 (by its L2 norm) | sum (by its total mass)"),
        "epsilon": Param(1e-6, number(0, low_open=True), "added to every Fisher entry (minimal Fisher weight)"),
        "weights": WEIGHTS,
    }

    def prepare(self, base: Mapping[str, torch.Tensor], finetuned: Sequence[Mapping[str, torch.Tensor]],
                stats: Sequence[Statistics]) -> None:
        self._names = set(stats[0].names("fisher"))
        norms = torch.ones(len(stats), dtype=torch.float64)
        mode = self.parameters["normalize"]
        if mode != "none":
            for i, st in enumerate(stats):
                total = sum(float(_fisher(st, key).square().sum() if mode == "l2" else _fisher(st, key).sum())
                            for key in st.names("fisher"))
                norms[i] = total ** 0.5 if mode == "l2" else total
                if not norms[i] > 0:
                    raise ValueError(f"{self.name}: statistics {i + 1} ({st.origin}) have a Fisher that sums to "
                                     f"{total}; normalize={mode!r} needs a positive one")
        self._coefficients = self.weights / norms

    def merge_parameter(self, name: str, base: torch.Tensor, finetuned: list[torch.Tensor],
                        stats: Sequence[Statistics]) -> torch.Tensor | None:
        if name not in self._names:
            return None
        eps = self.parameters["epsilon"]
        numerator = torch.zeros(base.shape, dtype=torch.float64, device=base.device)
        denominator = torch.zeros(base.shape, dtype=torch.float64, device=base.device)
        for c, theta, st in zip(self._coefficients.tolist(), finetuned, stats):
            weight = c * (_fisher(st, name) + eps)
            numerator += weight * theta.double()
            denominator += weight
        return numerator / denominator

    def global_passes(self) -> int:
        return 0 if self.parameters["normalize"] == "none" else 1


def _fisher(stats: Statistics, name: str) -> torch.Tensor:
    return stats.get("fisher", name).double()
