"""WUDI merging (Cheng et al., "Whoever Started the Interference Should End It"), fusion_bench's `WUDIMerging`.

Per weight matrix, the merged task vector `tau` minimises the interference each task vector `tau_i` sees
along its own rows, `L(tau) = sum_i ||(tau - tau_i) tau_i^T||_F^2 / ||tau_i||_F^2`, by `iter_num` steps of
Adam (torch's, lr 1e-5, betas (0.9, 0.999), eps 1e-8, no weight decay: the reference's constants) from
`tau = sum_i tau_i`. The gradient is closed-form, `2 (tau A - B)` with `A = sum_i A_i`,
`A_i = tau_i^T tau_i / |tau_i|^2` and `B = sum_i tau_i A_i`, so a step costs one `[m, p] x [p, p]` product
whatever the number of tasks; the optimisation runs in float64. The result is `base + tau` (no scaling, as
in the reference); tensors that are not matrices, and those in `exclude_keys`, get the mean task vector.

A zero task vector divides by zero in the reference's loss, which then makes the whole matrix NaN; here its
term is left out (it constrains nothing), so a matrix no model changed stays the base.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .base import Param, integer, register
from .subspace import EXCLUDE_KEYS, PerMatrix

LEARNING_RATE = 1e-5
BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


@register
class Wudi(PerMatrix):
    """WUDI: per matrix, Adam on the task vectors' self-interference loss (module docstring)."""

    name = "wudi"
    display_name = "WUDI"
    reference = "Cheng et al., 2025, Whoever Started the Interference Should End It"
    summary = "WUDI: per matrix, Adam steps on the interference with each task vector's own rows (data-free)"
    params = {
        "iter_num": Param(400, integer(0, 2**31), "Adam steps per matrix"),
        "exclude_keys": EXCLUDE_KEYS,
    }
    matrix_copies = 7

    def merge_matrix(self, tau: torch.Tensor) -> torch.Tensor:
        merged = tau.sum(0)
        gradient = _gradient(tau)
        first = torch.zeros_like(merged)
        second = torch.zeros_like(merged)
        beta1, beta2 = BETAS
        for step in range(1, self.parameters["iter_num"] + 1):
            grad = gradient(merged)
            first.lerp_(grad, 1 - beta1)
            second.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            correction1 = 1 - beta1**step
            correction2 = 1 - beta2**step
            denominator = (second.sqrt() / correction2**0.5).add_(ADAM_EPS)
            merged.addcdiv_(first, denominator, value=-LEARNING_RATE / correction1)
        return merged

    def state_bytes(self, layout, n, in_flight) -> int:
        # `A` is `[p, p]` unless the per-task form is cheaper (see `_gradient`)
        side = max((min(shape[1], 2 * n * shape[0]) for index, shape in enumerate(layout.shapes)
                    if self.is_matrix(layout, index)), default=0)
        return super().state_bytes(layout, n, in_flight) + 8 * side * side


def _gradient(tau: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """The loss's gradient at `tau` (a new tensor), for task vectors `tau` `[T, m, p]`.

    `2 (tau A - B)` costs `m p^2` per step after `T m p^2` once; summing `2 (tau - tau_i) tau_i^T tau_i /
    |tau_i|^2` over the tasks costs `2 T m^2 p` per step and no `[p, p]` matrix: used when `p > 2 T m`.
    """
    tasks = [(task, float(task.square().sum())) for task in tau]
    tasks = [(task, norm) for task, norm in tasks if norm > 0]
    m, p = tau.shape[1:]
    if p > 2 * len(tasks) * m:
        def per_task(merged: torch.Tensor) -> torch.Tensor:
            grad = torch.zeros_like(merged)
            for task, norm in tasks:
                grad.add_(((merged - task) @ task.T) @ task, alpha=2 / norm)
            return grad
        return per_task
    gram = torch.zeros(p, p, dtype=tau.dtype)  # A
    target = torch.zeros(m, p, dtype=tau.dtype)  # B
    for task, norm in tasks:
        own = (task.T @ task).div_(norm)
        gram.add_(own)
        # as `tau_i @ A_i`, the product the step computes: with one task the gradient at `tau = tau_1` is then
        # exactly 0, as the reference's, instead of rounding noise that Adam would amplify
        target.add_(task @ own)
    return lambda merged: (merged @ gram).sub_(target).mul_(2)
