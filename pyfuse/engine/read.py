"""The engine's reading room: sources read a bounded chunk at a time, on a pool of threads, and the merged tensors
of a plan as iterators over their flat chunks (streamed chunk by chunk, or merged in memory by a method that
needs whole models).
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import torch

from ..device import torch_threads
from ..distributed import Ranks
from ..finite import NonFiniteError, check_finite, finite_chunks
from ..methods import Chunk
from ..methods.data_aware import SourceTensors
from ..ops.profiling import nvtx_range
from ..progress import progress_bar

if TYPE_CHECKING:  # annotations only: the plan builds on this module
    from .plan import MergePlan

CHUNK_ELEMENTS = 1 << 18  # 1 MiB of fp32: a worker's temporaries stay near its L2 cache


class ChunkReader:
    """The engine's `MergeContext`: base and fine-tuned tensors as fp32 chunks, deltas computed on the fly.

    With a thread pool, `map` reads and processes up to `depth` chunks at once on the workers and yields
    the results in order. Each worker runs torch single-threaded: whole chunks in parallel scale better
    than many small ops split across threads (no per-op barriers, which stall when a core is busy).
    """

    def __init__(self, plan: MergePlan, progress: bool, pool: ThreadPoolExecutor | None,
                 share: tuple[Ranks, Sequence[int]] | None = None):
        self.layout, self.n, self.device = plan.layout, len(plan.models), plan.device
        self.threads = plan.workers
        self._plan, self._progress, self._pool = plan, progress, pool
        self._depth = 2 * plan.workers
        # distributed (`share`: the group and this process's tensors): a method that splits its whole-model
        # passes passes over its own tensors and sums over the ranks; any other passes over the whole model
        split = share is not None and plan.method.split_global_passes
        self._ranks = share[0] if split else None
        self._whole = share[1] if split else range(len(self.layout))

    def sum_over_ranks(self, value: torch.Tensor) -> torch.Tensor:
        return value if self._ranks is None else self._ranks.sum(value)

    def _spans(self, index: int | None, desc: str | None) -> Iterator[tuple[int, int, int, list[torch.Tensor]]]:
        """(tensor index, start, end, flat base and fine-tuned tensors) of every chunk to read."""
        indices = self._whole if index is None else (index,)
        show = self._progress and index is None and desc is not None
        size = self._plan.chunk_elements
        for s in progress_bar(indices, desc=desc, unit="tensor", leave=False, disable=not show):
            name = self.layout.names[s]
            # flattened once per tensor: free for files and contiguous tensors, a copy only for strided ones
            flats = [source.get(name).reshape(-1) for source in (self._plan.base, *self._plan.models)]
            numel = self.layout.shapes[s].numel()
            unit = self._plan.method.chunk_unit(self.layout.shapes[s])
            step = max(unit, size // unit * unit)
            for lo in range(0, numel, step):
                yield s, lo, min(lo + step, numel), flats

    def _load(self, s: int, lo: int, hi: int, flats: list[torch.Tensor]) -> Chunk:
        with nvtx_range("engine.read"):
            return self._read(s, lo, hi, flats)

    def _read(self, s: int, lo: int, hi: int, flats: list[torch.Tensor]) -> Chunk:
        if not self._plan.allow_nonfinite:
            for source, flat in zip((self._plan.base, *self._plan.models), flats):
                what = f"{source.label}: tensor {self.layout.names[s]!r}"
                try:
                    check_finite(flat[lo:hi], what)
                except NonFiniteError:
                    check_finite(flat, what)  # raises again, counting over the whole tensor
        base = flats[0][lo:hi].to(device=self.device, dtype=torch.float32)  # a view when already fp32
        deltas = torch.empty(self.n, hi - lo, device=self.device)
        for row, flat in zip(deltas, flats[1:]):
            torch.sub(flat[lo:hi].to(self.device), base, out=row)
        return Chunk(s, int(self.layout.offsets[s]) + lo, base, deltas)

    def map(self, fn: Callable[[Chunk], Any], index: int | None = None, desc: str | None = None) -> Iterator[Any]:
        spans = self._spans(index, desc)
        if self._pool is None:
            for span in spans:
                yield fn(self._load(*span))
            return
        pending: deque[Future] = deque()
        for span in spans:
            pending.append(self._pool.submit(lambda span=span: fn(self._load(*span))))
            if len(pending) >= self._depth:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


@contextlib.contextmanager
def workers(count: int) -> Iterator[ThreadPoolExecutor | None]:
    """A pool of `count` threads (None for one), with torch single-threaded meanwhile: the engine
    parallelises over chunks instead."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if count <= 1:
            yield None
        else:
            with ThreadPoolExecutor(count, thread_name_prefix="pyfuse-merge") as pool:
                yield pool
    finally:
        torch.set_num_threads(threads)


def merged_tensors(job: MergePlan, reader: ChunkReader, progress: bool,
                   outputs: Sequence[int] | None = None) -> Iterator[tuple[str, Iterator[torch.Tensor]]]:
    """Each output tensor of the plan `job` (or those at `outputs`), in order, as an iterator over its flat chunks
    (merged, or carried from the base).

    The method's global passes run when the first tensor is requested; a data method merges the whole
    model (or the tensors at `outputs`) then.
    """
    entries = job.outputs if outputs is None else [job.outputs[i] for i in outputs]
    if not job.method.streams:
        yield from _in_memory_tensors(job, progress, entries)
        return
    job.method.prepare(reader)
    index = layout_index(job)
    for name, shape, dtype in progress_bar(entries, desc=f"{job.method.name}: merging", unit="tensor",
                                           disable=not progress):
        if name in index:
            plan = job.method.plan(reader, index[name])
            chunks = reader.map(lambda chunk, plan=plan, dtype=dtype: _merge_chunk(job, chunk, plan, dtype),
                                index[name])
            yield name, _checked(job, name, chunks)
        else:
            flat = job.base.get(name).reshape(-1)
            yield name, (flat[lo: lo + job.chunk_elements] for lo in range(0, shape.numel(), job.chunk_elements))


def _merge_chunk(job: MergePlan, chunk: Chunk, plan: Any, dtype: torch.dtype) -> torch.Tensor:
    with nvtx_range("engine.merge"):
        return job.method.merge_chunk(chunk, plan).to(device="cpu", dtype=dtype)


def _checked(job: MergePlan, name: str, chunks: Iterator[torch.Tensor]) -> Iterator[torch.Tensor]:
    """The merged chunks of one tensor, in its output dtype, raising after the last if any was non-finite
    (NaN/inf inputs or statistics, or overflow in the merge or the cast to the output dtype)."""
    return finite_chunks(chunks, f"{job.method.name}: merged tensor {name!r}", job.allow_nonfinite)


def _in_memory_tensors(job: MergePlan, progress: bool, entries: Sequence[tuple[str, torch.Size, torch.dtype]]
                       ) -> Iterator[tuple[str, Iterator[torch.Tensor]]]:
    """A non-streaming (data or task-data) method's merge of `entries`, in memory on `workers` torch threads (the
    engine's pool serves chunks only). Tensors a task-data method's model lacks are carried from the base."""
    if not entries:
        return
    models = [SourceTensors(m) for m in job.models]
    keys = None if len(entries) == len(job.outputs) else [name for name, _, _ in entries]
    with torch_threads(job.workers), nvtx_range("engine.data_merge"):
        merged = job.method.merge_in_memory(job, models, keys, progress)
    floating = set(job.layout.names)
    for name, _, dtype in entries:
        flat = (merged.pop(name) if name in merged else job.base.get(name)).reshape(-1).to(dtype)
        chunks = (flat[lo: lo + job.chunk_elements] for lo in range(0, flat.numel(), job.chunk_elements))
        yield name, _checked(job, name, chunks) if name in floating else chunks


def layout_index(plan: MergePlan) -> dict[str, int]:
    """Each merged tensor's position in the layout, by name."""
    return {name: s for s, name in enumerate(plan.layout.names)}
