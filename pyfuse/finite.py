"""The one check that keeps non-finite values (NaN, inf, overflow on a cast) out of outputs unless allowed."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

_CHUNK = 1 << 20  # elements looked at at once, so checking a large tensor needs no tensor-sized temporary


class NonFiniteError(ValueError):
    """A tensor bound for an output (or read from an input) holds NaN or inf."""


def check_finite(tensor: torch.Tensor, what: str, allow: bool = False) -> torch.Tensor:
    """`tensor`, unchanged, after checking it holds no NaN or inf; the error names `what` and the count.

    `allow=True` (the `--allow-nonfinite` option) skips the check for those who want such values.
    """
    if allow:
        return tensor
    flat = tensor.detach().reshape(-1)
    _raise_if(sum(_count_nonfinite(flat[lo: lo + _CHUNK]) for lo in range(0, flat.numel(), _CHUNK)),
              flat.numel(), what)
    return tensor


def finite_chunks(chunks: Iterable[torch.Tensor], what: str, allow: bool = False) -> Iterator[torch.Tensor]:
    """The chunks of one tensor, passed on as they come; after the last, raise if any held NaN or inf."""
    bad = total = 0
    for chunk in chunks:
        if not allow:
            bad += _count_nonfinite(chunk.reshape(-1))
            total += chunk.numel()
        yield chunk
    _raise_if(bad, total, what)


def _count_nonfinite(chunk: torch.Tensor) -> int:
    if not chunk.is_floating_point():
        return 0
    # one reduction is far cheaper than an elementwise pass, and a NaN or inf anywhere makes the sum
    # non-finite; only then (or when finite values overflow the sum) are the offending values counted
    if bool(torch.isfinite(chunk.sum(dtype=torch.float32))):
        return 0
    return int((~torch.isfinite(chunk)).sum())


def _raise_if(bad: int, total: int, what: str) -> None:
    if bad:
        raise NonFiniteError(f"{what}: {bad} of {total} values are NaN or inf (pass --allow-nonfinite, "
                             "allow_nonfinite=True, to keep them)")
