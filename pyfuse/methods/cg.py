"""Matrix-free conjugate gradient in torch ops, for the symmetric positive (semi-)definite systems of MaTS.

The unknown is a whole parameter tensor; the operator is a callable mapping a tensor of that shape to one of
the same shape. `dims` says over which dimensions inner products are taken: the remaining dimensions index
independent systems that are solved side by side with their own step sizes (RegMean's operator `W -> W G`
is one system per output row, dims `(1,)`; a diagonal operator is one 1x1 system per entry, dims `()`,
and converges in one step; K-FAC couples every entry, dims `None` = all). Runs on the tensors' device.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

__all__ = ["CGResult", "conjugate_gradient"]


@dataclass(frozen=True)
class CGResult:
    """A CG solve: the solution, the steps taken, and the true residual norms `||b - A x||` (whole tensor)
    at the initial point and at the solution, with `||b||` to read them relatively."""

    solution: torch.Tensor
    iterations: int
    residual_before: float
    residual_after: float
    rhs_norm: float


def _dot(a: torch.Tensor, b: torch.Tensor, dims: tuple[int, ...] | None) -> torch.Tensor:
    """Inner products over `dims`, kept broadcastable against the tensors (one per independent system)."""
    if dims is None:
        return (a * b).sum()
    if not dims:  # torch sums over everything for dim=(); here it means no reduction at all
        return a * b
    return (a * b).sum(dim=dims, keepdim=True)


def conjugate_gradient(
    apply: Callable[[torch.Tensor], torch.Tensor],
    rhs: torch.Tensor,
    x0: torch.Tensor | None = None,
    *,
    iterations: int,
    tol: float = 0.0,
    dims: Sequence[int] | None = None,
    callback: Callable[[int, torch.Tensor], None] | None = None,
) -> CGResult:
    """Solve `apply(x) = rhs` by at most `iterations` CG steps from `x0` (zeros by default).

    `apply` must be linear, symmetric and positive semi-definite on each independent system. Steps stop
    early once `||r|| <= tol * ||rhs||` over the whole tensor (tol 0: never). A system whose residual or
    curvature along the search direction is exactly zero takes no further step, rather than dividing by zero
    (a singular operator leaves the component outside its range at its initial value). `callback(k, x)` is
    called after step k (1-based) with the current iterate, which it must not modify.
    """
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations}")
    if x0 is not None and x0.shape != rhs.shape:
        raise ValueError(f"x0 has shape {list(x0.shape)}, expected the right-hand side's {list(rhs.shape)}")
    reduce = None if dims is None else tuple(d % rhs.dim() for d in dims)
    x = torch.zeros_like(rhs) if x0 is None else x0.clone()
    r = rhs - apply(x)
    rhs_norm = float(torch.linalg.vector_norm(rhs))
    before = float(torch.linalg.vector_norm(r))
    p = r.clone()
    rr = _dot(r, r, reduce)
    steps = 0
    for steps in range(1, iterations + 1):
        if tol > 0 and float(rr.sum()) ** 0.5 <= tol * rhs_norm:
            steps -= 1
            break
        ap = apply(p)
        pap = _dot(p, ap, reduce)
        alpha = torch.where(pap > 0, rr / torch.where(pap > 0, pap, 1), 0)
        x.add_(alpha * p)
        r.sub_(alpha * ap)
        rr_next = _dot(r, r, reduce)
        beta = torch.where(rr > 0, rr_next / torch.where(rr > 0, rr, 1), 0)
        p = r + beta * p
        rr = rr_next
        if callback is not None:
            callback(steps, x)
    # the recursive residual drifts from the true one in low precision: report the true one
    after = float(torch.linalg.vector_norm(rhs - apply(x)))
    return CGResult(x, steps, before, after, rhs_norm)
