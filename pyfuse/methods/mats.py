"""MaTS: merging by matching models in their task subspaces, solved per tensor by conjugate gradient.

For each parameter tensor the merge solves `(sum_i C_i) theta = sum_i C_i theta_i`
(docs/data-aware-methods.md, MaTS), with
`C_i` one of
- `diagonal_fisher`: `diag(F_i)`, the diagonal Fisher of the parameter;
- `regmean`: `I kron G_i`, `G_i` the input Gram of a Linear layer (closed form `W^T = (sum G_i)^-1 sum G_i W_i^T`);
- `kfac`: the block-diagonal K-FAC Fisher `A_i kron S_i`, `A` the input Gram and `S` the output-gradient Gram.
Grams are regularised `l*G + (1-l)*diag(G)`. CG starts from task arithmetic, the average or a given model.
Every model has statistics for the same parameters (`DataMethod.check`); the others are averaged.
Residual norms before and after CG are logged and kept per tensor in `self.result`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from ..io.sources import TensorSource, open_source
from ..layout import FlatLayout
from ..stats import Statistics
from .base import Param, choice, integer, number, register
from .cg import conjugate_gradient
from .data_aware import DataMethod
from .regmean import regularize_gram

__all__ = ["MaTS", "diagonal_fisher_system", "kfac_system", "regmean_system", "regularize_gram"]

logger = logging.getLogger(__name__)

Operator = Callable[[torch.Tensor], torch.Tensor]
System = tuple[Operator, torch.Tensor, "tuple[int, ...] | None"]
"""A linear system for `conjugate_gradient`: the operator, the right-hand side, and the reduction dims."""


def diagonal_fisher_system(fishers: Sequence[torch.Tensor], params: Sequence[torch.Tensor]) -> System:
    """`(sum F_i) * theta = sum F_i * theta_i`, elementwise: every entry is its own 1x1 system."""
    total = sum(fishers[1:], fishers[0].clone())  # no stacked [n, ...] temporary
    rhs = sum(f * p for f, p in zip(fishers, params))
    return (lambda x: total * x), rhs, ()


def regmean_system(grams: Sequence[torch.Tensor], weights: Sequence[torch.Tensor]) -> System:
    """RegMean in torch's `[out, in]` orientation: `W G = sum_i W_i G_i` with `G = sum G_i`.

    The paper writes `(sum G_i) W^T = sum G_i W_i^T` for `[in, out]` weights; transposing (G symmetric)
    gives this form, in which each output row of W is an independent system with matrix G.
    """
    total = sum(grams[1:], grams[0].clone())
    rhs = sum(w @ g for w, g in zip(weights, grams))
    return (lambda x: x @ total), rhs, (1,)


def kfac_system(grams_in: Sequence[torch.Tensor], grams_out: Sequence[torch.Tensor],
                weights: Sequence[torch.Tensor]) -> System:
    """Block-diagonal K-FAC merge in torch's `[out, in]` orientation: `sum_i S_i W A_i = sum_i S_i W_i A_i`.

    The paper's `sum_i A_i M S_i = sum_i A_i W_i^T S_i` solves for `M = W^T` (`[in, out]`); transposing both
    sides (A and S symmetric) gives this form for W itself. Every entry is coupled: one system per tensor.
    """
    pairs = list(zip(grams_in, grams_out))
    rhs = sum(s @ w @ a for (a, s), w in zip(pairs, weights))
    return (lambda x: sum(s @ x @ a for a, s in pairs)), rhs, None


_NEEDS = {"diagonal_fisher": ("fisher",), "regmean": ("gram_in",), "kfac": ("gram_in", "gram_out")}


def _model(value: Any) -> Any:
    if isinstance(value, Mapping) or isinstance(value, (str, bytes)) or hasattr(value, "__fspath__"):
        return value
    raise TypeError(f"must be a state dict or a path to a model, got {type(value).__name__}")


@register
class MaTS(DataMethod):
    """MaTS: per-tensor conjugate gradient on `(sum_i C_i) theta = sum_i C_i theta_i` (see the module docstring).

    After a merge, `self.result` holds the objective, the starting point, and per solved tensor the CG steps
    and the residual norms before and after (for the merge report); parameters without statistics are
    averaged by `DataMethod.average`.
    """

    name = "mats"
    display_name = "MaTS"
    reference = "Tam et al., 2024, Merging by Matching Models in Task Parameter Subspaces"
    summary = "matching models in task subspaces: CG on Fisher / RegMean / K-FAC systems"
    needs = ("fisher", "gram_in", "gram_out")  # the union; an instance needs only its objective's (see __init__)
    params = {
        "objective": Param("kfac", choice(*_NEEDS),
                           "C_i: diagonal_fisher, regmean (I kron G_i) or kfac (A_i kron S_i)"),
        "regularization": Param(0.9, number(0.0, 1.0), "l in l*G + (1-l)*diag(G) for every Gram (1: unchanged)"),
        "init": Param("task_arithmetic", choice("task_arithmetic", "average", "model"),
                      "CG's starting point: task arithmetic, the average, or init_model"),
        "init_scaling": Param(0.3, number(), "lambda of the task-arithmetic starting point"),
        "init_model": Param(None, _model, "the starting model when init is 'model' (path or state dict)", path=True),
        "iterations": Param(100, integer(0, 1_000_001), "CG steps per tensor (the paper uses 10-100)"),
        "tolerance": Param(0.0, number(0.0), "stop a tensor's CG once ||r|| <= tolerance * ||rhs|| (0: never)"),
    }

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        if (self.parameters["init"] == "model") != (self.parameters["init_model"] is not None):
            raise ValueError(f"{self.name}: init_model is required with init 'model' and only used with it")
        self.needs = _NEEDS[self.parameters["objective"]]
        self.result: dict[str, Any] = {}
        self._init: TensorSource | None = None

    def check(self, base, finetuned, stats) -> FlatLayout:
        """`DataMethod.check`, and the starting model's tensors against the base's layout."""
        layout = super().check(base, finetuned, stats)
        self._init = None
        if self.parameters["init"] == "model":
            init = open_source(self.parameters["init_model"], "init_model")
            for name, shape in zip(layout.names, layout.shapes):
                if name not in init.specs or init.shape(name) != shape:
                    got = list(init.shape(name)) if name in init.specs else "missing"
                    raise ValueError(f"{self.name}: init_model tensor {name!r}: {got}, expected shape {list(shape)}")
            self._init = init
        return layout

    def prepare(self, base, finetuned, stats) -> None:
        self._solvable = set(stats[0].names(self.needs[0]))  # check() made every model cover the same names
        self.result = {"objective": self.parameters["objective"], "init": self.parameters["init"], "solved": {}}

    def merge_parameter(self, name: str, base: torch.Tensor, finetuned: list[torch.Tensor],
                        stats: Sequence[Statistics]) -> torch.Tensor | None:
        """The CG solution for a parameter with statistics (float64), None (averaged) for the others."""
        if name not in self._solvable:
            return None
        cfg = self.parameters
        thetas = [t.double() for t in finetuned]
        x0 = self._initial(name, base, thetas)
        if cfg["objective"] == "diagonal_fisher":
            apply, rhs, dims = diagonal_fisher_system([self._stat(st, "fisher", name, base) for st in stats], thetas)
            flip = False
        else:
            # Grams are [in, in] / [out, out] whatever the storage; Conv1D-style weights stored [in, out] are
            # solved for in the [out, in] orientation and turned back
            flip = name in stats[0].transposed
            if flip:
                thetas, x0 = [t.T for t in thetas], x0.T
            grams_in = [self._gram(st, "gram_in", name, base) for st in stats]
            if cfg["objective"] == "regmean":
                apply, rhs, dims = regmean_system(grams_in, thetas)
            else:
                apply, rhs, dims = kfac_system(grams_in, [self._gram(st, "gram_out", name, base) for st in stats],
                                               thetas)
        solved = conjugate_gradient(apply, rhs, x0, iterations=cfg["iterations"], tol=cfg["tolerance"], dims=dims)
        self.result["solved"][name] = {
            "iterations": solved.iterations, "rhs_norm": solved.rhs_norm,
            "residual_before": solved.residual_before, "residual_after": solved.residual_after,
        }
        logger.info("%s %s: residual %.4g -> %.4g after %d CG steps (||rhs|| %.4g)", self.name, name,
                    solved.residual_before, solved.residual_after, solved.iterations, solved.rhs_norm)
        return solved.solution.T if flip else solved.solution

    def working_bytes(self, layout: FlatLayout, n: int) -> int:
        """`DataMethod`'s estimate plus every model's float64 statistics of the largest parameter."""
        objective = self.parameters["objective"]
        if objective == "diagonal_fisher":
            held = max(shape.numel() for shape in layout.shapes)
        else:  # either side may be `in` (Conv1D storage): count the larger for a regmean Gram
            held = max((a * a + b * b if objective == "kfac" else max(a, b) ** 2
                        for a, b in (shape for shape in layout.shapes if len(shape) == 2)), default=0)
        return super().working_bytes(layout, n) + 8 * n * held

    def _stat(self, stats: Statistics, kind: str, name: str, like: torch.Tensor) -> torch.Tensor:
        return stats.get(kind, name).to(device=like.device, dtype=torch.float64)

    def _gram(self, stats: Statistics, kind: str, name: str, like: torch.Tensor) -> torch.Tensor:
        return regularize_gram(self._stat(stats, kind, name, like), self.parameters["regularization"])

    def _initial(self, name: str, base: torch.Tensor, thetas: list[torch.Tensor]) -> torch.Tensor:
        """CG's starting point for one parameter, float64."""
        if self._init is not None:
            return self._init.get(name).to(device=base.device, dtype=torch.float64)
        if self.parameters["init"] == "average":
            return self.average(base, thetas)
        b = base.double()
        return b + self.parameters["init_scaling"] * sum(t - b for t in thetas)
