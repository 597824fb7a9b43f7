"""Linear merges: the (weighted) average and Task Arithmetic, both `b + sum_i c_i tau_i` through the fused op."""

from __future__ import annotations

from typing import Any

import torch

from ..ops import concrete_merge
from .base import WEIGHTS, Chunk, Param, StaticMethod, number, register


def weighted_sum(base: torch.Tensor, deltas: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
    """`base + sum_i coefficients[i] * deltas[i]` (fp32), by the fused op with its mask switched off."""
    c = base.numel()
    offsets = torch.tensor([0, c], dtype=torch.int64, device=base.device)
    return concrete_merge(
        base, deltas, torch.zeros(c, device=base.device), coefficients.to(base.device), offsets,
        seed=0, mask="none", rescale=False,
    )


def load_op() -> None:
    """The op's first call loads its backend and torch's dispatch machinery (~1.5 s, ~80 MB, once per
    process): methods that use it call this in `bind`, so that it is part of the baseline a dry run
    measures, not of the merge."""
    weighted_sum(torch.zeros(1), torch.zeros(1, 1), torch.ones(1))


class _Linear(StaticMethod):
    temporaries = (1, 3)
    fused = True

    def fused_mask(self, device: torch.device, numel: int) -> tuple[torch.Tensor, dict[str, Any]]:
        """No mask: the fused op with mask "none" is the weighted sum."""
        return torch.zeros(numel, device=device), {"seed": 0, "mask": "none", "rescale": False}

    def bind(self, layout, n) -> None:
        super().bind(layout, n)
        load_op()

    def coefficients(self) -> torch.Tensor:
        raise NotImplementedError

    def merge_chunk(self, chunk: Chunk, plan: None) -> torch.Tensor:
        return weighted_sum(chunk.base, chunk.deltas, self.coefficients())


@register
class Average(_Linear):
    """The mean of the fine-tuned models, weighted by `weights` if given: `b + sum_i (w_i / sum w) tau_i`."""

    name = "average"
    display_name = "Weight Averaging"
    reference = "Wortsman et al., 2022, Model soups"
    summary = "mean of the fine-tuned models (optionally weighted)"
    params = {"weights": WEIGHTS}

    def bind(self, layout, n) -> None:
        super().bind(layout, n)
        total = float(self.weights.sum())
        if total == 0:
            raise ValueError(f"{self.name}: weights sum to 0; their mean is undefined")
        self._coefficients = self.weights / total

    def coefficients(self) -> torch.Tensor:
        return self._coefficients


@register
class TaskArithmetic(_Linear):
    """Task Arithmetic: `b + scaling * sum_i w_i tau_i`."""

    name = "task_arithmetic"
    display_name = "Task Arithmetic"
    reference = "Ilharco et al., 2023, Editing Models with Task Arithmetic"
    summary = "base + scaling * sum of the task vectors"
    params = {
        "scaling": Param(0.3, number(), "lambda, the factor on the summed task vectors"),
        "weights": WEIGHTS,
    }

    def coefficients(self) -> torch.Tensor:
        return self.parameters["scaling"] * self.weights
