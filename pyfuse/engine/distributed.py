"""The engine's shares of the work: which output tensors each process of a distributed merge reads, merges and
writes (the process group itself is `pyfuse.distributed`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from .. import distributed
from .read import layout_index

if TYPE_CHECKING:  # annotations only: the plan builds on this module
    from .plan import MergePlan


def rank_starts(job: MergePlan, world: int) -> list[int]:
    """Where each rank's run of output tensors starts (and the end): balanced by bytes, or all on rank 0
    for a method that merges the whole model at once (`Method.merges_whole_model`)."""
    if job.method.merges_whole_model:
        return [0] + [len(job.outputs)] * world
    sizes = [shape.numel() * torch.empty((), dtype=dtype).element_size() for _, shape, dtype in job.outputs]
    return distributed.split_by_bytes(sizes, world)


def own_tensors(job: MergePlan, own: Sequence[int]) -> list[int]:
    """The layout positions of the merged tensors among the outputs at `own` (a rank's share)."""
    index = layout_index(job)
    return [index[job.outputs[i][0]] for i in own if job.outputs[i][0] in index]
