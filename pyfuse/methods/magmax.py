"""MagMax (Marczak et al., 2024) as fusion_bench merges it: per entry, the task-vector value of largest
magnitude (a later model winning a tie), scaled: `b + scaling * tau_max`.

fusion_bench's `scaling_factor` is `scaling` here (default 0.5, as its config and the authors' script);
integer and boolean buffers, which it carries from the base, are never merged by pyfuse either. One pass,
per chunk, through `sparsify.max_magnitude`.
"""

from __future__ import annotations

import torch

from .base import Chunk, Param, StaticMethod, number, register
from .sparsify import max_magnitude


@register
class MagMax(StaticMethod):
    """MagMax: the largest-magnitude task-vector entry across the models, scaled."""

    name = "magmax"
    display_name = "MagMax"
    reference = "Marczak et al., 2024, MagMax"
    summary = "per entry, the task-vector value of largest magnitude (later model on ties), times `scaling`"
    params = {
        "scaling": Param(0.5, number(), "the factor on the selected task vector (fusion_bench's scaling_factor)"),
    }
    temporaries = (0, 4)

    def merge_chunk(self, chunk: Chunk, plan: None) -> torch.Tensor:
        return torch.add(chunk.base, max_magnitude(chunk.deltas), alpha=self.parameters["scaling"])
