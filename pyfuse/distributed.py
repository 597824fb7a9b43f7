"""Scale-out on `torch.distributed`: a merge split across the processes `torchrun` starts (gloo or NCCL).

`group(device)` joins the process group `torchrun` describes in the environment (WORLD_SIZE, RANK,
MASTER_ADDR, ...), or uses one the caller initialised; with neither it yields None and everything runs
in one process. The ranks talk only through `Ranks.sync`, one `all_gather_object` per synchronisation
point, which carries each rank's payload and, from a rank that failed, its error instead: every rank
runs the same sequence of syncs, and a failing rank sends its error in place of the next one
(`Ranks.fail`), so the others raise it at the sync where they wait rather than hang in a collective.
The tensor collectives (`Ranks.all_reduce`, `Ranks.all_gather_flat`) sync first for the same reason.
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import os
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["RankFailed", "Ranks", "current", "group", "segment_shards", "split_by_bytes"]

# a rank waits this long at a sync for the slowest one (whose share of a large merge may take long)
TIMEOUT = datetime.timedelta(hours=6)


class RankFailed(RuntimeError):
    """Another rank failed; the message is that rank's error."""


@dataclass
class Ranks:
    """This process's place in the group: `rank` of `world_size`, over `backend`."""

    rank: int
    world_size: int
    backend: str
    _failed: bool = False

    def sync(self, payload: Any = None) -> list[Any]:
        """Every rank's payload, in rank order; raises `RankFailed` (with its error) if a rank failed."""
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, (None, payload))
        errors = [(rank, error) for rank, (error, _) in enumerate(gathered) if error is not None]
        if errors:
            self._failed = True
            rank, error = errors[0]
            raise RankFailed(f"rank {rank} of {self.world_size} failed: {error}")
        return [value for _, value in gathered]

    def fail(self, error: BaseException) -> None:
        """Send `error` to the other ranks in place of this rank's next sync (once; not for a `RankFailed`,
        which every rank learned at the same sync)."""
        if self._failed or isinstance(error, RankFailed):
            return
        self._failed = True
        message = f"{type(error).__name__}: {error}" if str(error) else "".join(
            traceback.format_exception_only(type(error), error)).strip()
        dist.all_gather_object([None] * self.world_size, (message, None))

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The elementwise sum over ranks, added in rank order (exact for integer tensors)."""
        parts = self.sync(tensor.cpu())
        total = parts[0].clone()
        for part in parts[1:]:
            total += part
        return total.to(tensor.device)

    def all_reduce(self, tensor: torch.Tensor) -> None:
        """Sum `tensor` over the ranks, in place (after a sync: a failed rank's error is raised instead)."""
        self.sync()
        dist.all_reduce(tensor)

    def all_gather_flat(self, shard: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
        """The 1-D shards of every rank (rank r's has `sizes[r]` elements) concatenated in rank order (after a
        sync), not differentiable. The collective moves equal sizes, so each shard travels padded to the longest."""
        if shard.dim() != 1 or shard.numel() != sizes[self.rank]:
            raise ValueError(f"rank {self.rank}: shard must be [{sizes[self.rank]}], got {list(shard.shape)}")
        self.sync()
        width = max(sizes)
        padded = shard.new_zeros(self.world_size, width)
        padded[self.rank, :shard.numel()] = shard.detach()
        dist.all_gather(list(padded), padded[self.rank].clone())  # the input must not alias an output
        return torch.cat([row[:size] for row, size in zip(padded, sizes)])

    @contextlib.contextmanager
    def failing_together(self) -> Iterator[None]:
        """Run a block whose error, on any rank, every rank raises at its next sync."""
        try:
            yield
        except BaseException as err:
            self.fail(err)
            raise


def current() -> Ranks | None:
    """The initialised process group (of more than one process), or None."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return Ranks(dist.get_rank(), dist.get_world_size(), str(dist.get_backend()))
    return None


@contextlib.contextmanager
def group(device: torch.device | str = "cpu") -> Iterator[Ranks | None]:
    """The process group of this run: joined from torchrun's environment (and left after), or the one the
    caller initialised, or None for a single process (no WORLD_SIZE, or WORLD_SIZE=1)."""
    if dist.is_available() and dist.is_initialized():
        yield current()
        return
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        yield None
        return
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE is set (torchrun?) but this torch build has no torch.distributed")
    backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=TIMEOUT)
    try:
        yield Ranks(dist.get_rank(), dist.get_world_size(), backend)
    finally:
        dist.destroy_process_group()


def split_by_bytes(sizes: Sequence[int], parts: int) -> list[int]:
    """Where `parts` contiguous runs of items with these byte sizes start, each near `1/parts` of the total.

    Returns `parts + 1` indices (first 0, last `len(sizes)`); run r is `[starts[r], starts[r + 1])`. An item
    goes to the run whose byte range holds its midpoint, so no run is more than one item off its share.
    """
    before = [0, *itertools.accumulate(sizes)]  # bytes of the items before each index
    starts, edge = [0], 0
    for rank in range(1, parts):
        target = before[-1] * rank / parts
        while edge < len(sizes) and before[edge] + sizes[edge] / 2 < target:
            edge += 1
        starts.append(edge)
    return [*starts, len(sizes)]


def segment_shards(sizes: Sequence[int], world_size: int) -> list[tuple[int, int]]:
    """Each rank's contiguous run `[first, last)` of segments with these sizes, balanced by bytes
    (`split_by_bytes`); raises if a rank would get none (more ranks than the segments can feed)."""
    starts = split_by_bytes(sizes, world_size)
    runs = list(zip(starts[:-1], starts[1:]))
    empty = [rank for rank, (first, last) in enumerate(runs) if first == last]
    if empty:
        raise ValueError(f"{len(sizes)} segments of {sum(sizes)} elements cannot be split over {world_size} ranks: "
                         f"rank {empty[0]} would hold none; use fewer ranks")
    return runs
