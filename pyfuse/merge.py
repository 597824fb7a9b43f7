"""`pyfuse.merge`: merges of whole models, in memory or streamed from and to safetensors.

One engine serves both: models are read a bounded chunk at a time (memory-mapped for files), the method
merges chunk by chunk in fp32, and the result is either gathered into a state dict (`merge`) or
written straight into sharded safetensors (`merge_to_dir`), so a streamed merge holds a few chunks, a
method's small tables and nothing proportional to the model. `plan_merge` checks everything, and
predicts memory and output size, from the headers alone, before any tensor data is read.

Data-aware methods (`DataMethod`: fisher, regmean, ...) take `statistics=[...]`, one `Statistics` (or
saved file) per fine-tuned model. They are checked the same way before any work, then merge in memory
(reading each input tensor when they get to it) and write through the same sharded writer and report.
Methods that run the models on the tasks' data themselves (`TaskDataMethod`: regmean++) take `tasks=[...]`,
one `pyfuse.Task` per fine-tuned model, and the model (the base as an `nn.Module`, or `model=`); they too
merge in memory, in one process (rank 0 under torchrun), and write the same way.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import distributed
from .device import resolve_device, torch_threads
from .distributed import Ranks
from .finite import NonFiniteError, check_finite, finite_chunks
from .io.atomic import check_output_dir, remove_stale_partials
from .io.hashing import sha256_file
from .io.sources import TensorSource, checkpoint_files, open_source
from .io.writer import ShardedWriter, parse_size, small_files
from .layout import FlatLayout
from .memory import PeakRssAnon, rss_anon_bytes
from .method_kinds import check_device_applies, method_kind
from .methods import Chunk, StaticMethod, create_method, get_method
from .methods.data import DataMethod, SourceTensors, TaskDataMethod
from .ops.profiling import nvtx_range, timed_range
from .progress import progress_bar
from .stats import Statistics
from .task import Task
from .taskvectors import _label

__all__ = ["MergePlan", "merge", "merge_to_dir", "parse_dtype", "plan_merge", "rss_anon_bytes"]

CHUNK_ELEMENTS = 1 << 18  # 1 MiB of fp32: a worker's temporaries stay near its L2 cache
DEFAULT_SHARD_SIZE = "5GB"
REPORT_NAME = "merge_report.json"
_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """A floating output dtype from a torch dtype or a name ("bfloat16", "bf16", "float32", ...); None stays None."""
    if dtype is None or dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.lower().removeprefix("torch.") in _DTYPES:
        return _DTYPES[dtype.lower().removeprefix("torch.")]
    raise ValueError(f"unsupported output dtype {dtype!r}; choose one of float32, bfloat16, float16")


class _Reader:
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
        split = share is not None and isinstance(plan.method, StaticMethod) and plan.method.split_global_passes
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
def _workers(count: int) -> Iterator[ThreadPoolExecutor | None]:
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


@dataclass
class MergePlan:
    """A checked merge: method, inputs, layout and output tensors, known from headers alone."""

    method: StaticMethod | DataMethod | TaskDataMethod
    base: TensorSource
    models: list[TensorSource]
    layout: FlatLayout
    outputs: list[tuple[str, torch.Size, torch.dtype]]  # every tensor of the result, in the base's order
    device: torch.device
    chunk_elements: int
    workers: int  # chunks processed at once (threads); 1 runs everything on the calling thread
    inputs: list[Any] = field(repr=False)  # what the caller passed: base first, then the fine-tuned models
    statistics: list[Statistics] | None = None  # data methods: one per fine-tuned model
    tasks: list[Task] | None = field(default=None, repr=False)  # task-data methods: one per fine-tuned model
    model: torch.nn.Module | None = field(default=None, repr=False)  # task-data methods: the architecture
    allow_nonfinite: bool = False  # let NaN/inf through (inputs and output) instead of raising

    @property
    def output_bytes(self) -> int:
        return sum(shape.numel() * torch.empty((), dtype=dtype).element_size() for _, shape, dtype in self.outputs)

    def predicted_peak_bytes(self, baseline: int | None = None) -> int:
        """Anonymous memory the merge will peak at: `baseline` (default: this process now) plus the working set.

        The working set is, per worker, one chunk's deltas and fp32 base and the method's chunk-sized
        temporaries; the merged chunks waiting to be written; the method's tables; all times the slack
        of the allocator, whose per-thread arenas keep freed chunks (1.5, measured with glibc). Not
        included: the result of `state_dict`, which holds the merged model. A data method holds the merged
        model in memory and its per-parameter temporaries (`DataMethod.working_bytes`).
        """
        if baseline is None:
            baseline = rss_anon_bytes() or 0
        n = len(self.models)
        if isinstance(self.method, DataMethod):
            return baseline + int(1.5 * (self.output_bytes + self.method.working_bytes(self.layout, n)))
        if isinstance(self.method, TaskDataMethod):
            model_bytes = sum(t.numel() * t.element_size() for t in self.model.state_dict().values())
            return baseline + int(1.5 * (self.output_bytes + self.method.working_bytes(model_bytes)))
        per_model, constant = self.method.temporaries
        chunk = min(self.chunk_elements, max(shape.numel() for shape in self.layout.shapes)) * 4
        in_flight = 2 * self.workers
        working = self.workers * chunk * (n + 1 + per_model * n + constant) + in_flight * chunk
        return baseline + int(1.5 * (working + self.method.state_bytes(self.layout, n, in_flight)))

    def summary(self) -> dict[str, Any]:
        """What will be merged and written, as JSON-ready values (dry runs print it; reports include it)."""
        n = len(self.models)
        statistics = {"statistics": [st.describe() for st in self.statistics]} if self.statistics else {}
        if self.tasks:
            statistics["tasks"] = [task.name for task in self.tasks]
        out_dtypes = sorted({str(dtype).removeprefix("torch.") for name, _, dtype in self.outputs
                             if name in set(self.layout.names)})
        return {
            "method": self.method.name,
            "parameters": _jsonable(self.method.config),
            "inputs": [_describe(source, raw, role) for source, raw, role in
                       zip([self.base, *self.models], self.inputs, ["base"] + ["fine-tuned"] * n)],
            "merged_tensors": len(self.layout),
            "merged_parameters": self.layout.numel,
            "carried_tensors": len(self.outputs) - len(self.layout),
            "output_dtype": out_dtypes[0] if len(out_dtypes) == 1 else out_dtypes,
            "output_bytes": self.output_bytes,
            "device": str(self.device),
            "chunk_elements": self.chunk_elements,
            "threads": self.workers,
            "global_passes": self.method.global_passes(),
            "tensor_passes": getattr(self.method, "tensor_passes", lambda: 0)(),
            "predicted_peak_rss_anon_bytes": self.predicted_peak_bytes(),
            "dtype_upcasts": self.dtype_upcasts(),
            **statistics,
        }

    def dtype_upcasts(self) -> list[str]:
        """Fine-tuned models whose floating dtypes differ from the base's. Every input is read into fp32 and
        merged in fp32, so such models merge exactly; reports say which ones did."""
        notes = []
        for model in self.models:
            differ = [(name, model.dtype(name)) for name, dtype in zip(self.layout.names, self.layout.dtypes)
                      if model.dtype(name) != dtype]
            if differ:
                found = sorted({str(dtype).removeprefix("torch.") for _, dtype in differ})
                base = sorted({str(self.base.dtype(name)).removeprefix("torch.") for name, _ in differ})
                notes.append(f"{model.label}: {len(differ)} tensor(s) are {'/'.join(found)} where the base's are "
                             f"{'/'.join(base)} (first {differ[0][0]!r}); both read into float32 and merged in "
                             f"float32")
        return notes

    def input_paths(self) -> list[Path]:
        """Every file or directory the merge reads: models, statistics files, path parameters (mask logits)."""
        paths = [raw for raw in self.inputs if isinstance(raw, (str, os.PathLike))]
        paths += [st.path for st in self.statistics or () if st.path is not None]
        declared = self.method.params
        paths += [value for key, value in self.method.config.items()
                  if key in declared and declared[key].path and isinstance(value, (str, os.PathLike))]
        return [Path(p) for p in paths]

    def _tensors(self, reader: _Reader, progress: bool,
                 outputs: Sequence[int] | None = None) -> Iterator[tuple[str, Iterator[torch.Tensor]]]:
        """Each output tensor (or those at `outputs`), in order, as an iterator over its flat chunks (merged, or
        carried from the base).

        The method's global passes run when the first tensor is requested; a data method merges the whole
        model (or the tensors at `outputs`) then.
        """
        entries = self.outputs if outputs is None else [self.outputs[i] for i in outputs]
        if isinstance(self.method, (DataMethod, TaskDataMethod)):
            yield from self._data_tensors(progress, entries)
            return
        self.method.prepare(reader)
        index = self._layout_index
        for name, shape, dtype in progress_bar(entries, desc=f"{self.method.name}: merging", unit="tensor",
                                               disable=not progress):
            if name in index:
                plan = self.method.plan(reader, index[name])
                chunks = reader.map(lambda chunk, plan=plan, dtype=dtype: self._merge_chunk(chunk, plan, dtype),
                                    index[name])
                yield name, self._checked(name, chunks)
            else:
                flat = self.base.get(name).reshape(-1)
                yield name, (flat[lo: lo + self.chunk_elements] for lo in range(0, shape.numel(), self.chunk_elements))

    def _merge_chunk(self, chunk: Chunk, plan: Any, dtype: torch.dtype) -> torch.Tensor:
        with nvtx_range("engine.merge"):
            return self.method.merge_chunk(chunk, plan).to(device="cpu", dtype=dtype)

    def _checked(self, name: str, chunks: Iterator[torch.Tensor]) -> Iterator[torch.Tensor]:
        """The merged chunks of one tensor, in its output dtype, raising after the last if any was non-finite
        (NaN/inf inputs or statistics, or overflow in the merge or the cast to the output dtype)."""
        return finite_chunks(chunks, f"{self.method.name}: merged tensor {name!r}", self.allow_nonfinite)

    def _data_tensors(self, progress: bool, entries: Sequence[tuple[str, torch.Size, torch.dtype]]
                      ) -> Iterator[tuple[str, Iterator[torch.Tensor]]]:
        """A data or task-data method's merge of `entries`, in memory on `workers` torch threads (the engine's
        pool serves chunks only). Tensors a task-data method's model lacks are carried from the base."""
        if not entries:
            return
        models = [SourceTensors(m) for m in self.models]
        for st, model, source in zip(self.statistics or (), models, self.models):
            st.check_model(model, source.label)
        keys = None if len(entries) == len(self.outputs) else [name for name, _, _ in entries]
        with torch_threads(self.workers), nvtx_range("engine.data_merge"):
            if isinstance(self.method, TaskDataMethod):
                merged = self.method.merge(self.model, models, self.tasks, base=SourceTensors(self.base),
                                           progress=progress)
            else:
                merged = self.method.merge_model(SourceTensors(self.base, keys), models, self.statistics,
                                                 progress=progress)
        floating = set(self.layout.names)
        for name, _, dtype in entries:
            flat = (merged.pop(name) if name in merged else self.base.get(name)).reshape(-1).to(dtype)
            chunks = (flat[lo: lo + self.chunk_elements] for lo in range(0, flat.numel(), self.chunk_elements))
            yield name, self._checked(name, chunks) if name in floating else chunks

    def state_dict(self, progress: bool = False) -> dict[str, torch.Tensor]:
        """Run the merge and return the result in memory (CPU tensors, shaped as the base's)."""
        result = {}
        shapes = {name: (shape, dtype) for name, shape, dtype in self.outputs}
        with _workers(self.workers) as pool:
            for name, chunks in self._tensors(_Reader(self, progress, pool), progress):
                shape, dtype = shapes[name]
                flat = torch.empty(shape.numel(), dtype=dtype)
                lo = 0
                with nvtx_range(f"engine.tensor:{name}"):
                    for chunk in chunks:
                        flat[lo: lo + chunk.numel()].copy_(chunk)
                        lo += chunk.numel()
                result[name] = flat.view(shape)
        return result

    def write(self, out_dir: str | os.PathLike, *, force: bool = False, shard_size: int | str = DEFAULT_SHARD_SIZE,
              hash_inputs: bool = True, progress: bool = False,
              other_inputs: Sequence[str | os.PathLike] = ()) -> dict[str, Any]:
        """Run the merge streaming into `out_dir` (sharded safetensors, the base's small files, a report).

        `out_dir` is checked first (`pyfuse.io.atomic.check_output_dir`): it must not exist unless `force`,
        and may never hold an input (nor `other_inputs`, e.g. the config file). Temporary directories of
        `out_dir` left by killed runs are removed (the report lists them). Returns the report also written
        to `out_dir/merge_report.json`.

        Under torchrun (or in an initialised `torch.distributed` group), the processes split the output
        tensors, contiguous runs balanced by bytes: each reads, merges and writes its own shards of one
        temporary directory, and rank 0 writes the index and report and commits once every rank is done
        (`pyfuse.distributed`). The tensors are bit-identical to one process's; an error on any rank is
        raised on every rank and nothing is committed. Every rank returns the report.
        """
        with distributed.group(self.device) as ranks:
            if ranks is None:
                return self._write(out_dir, force, shard_size, hash_inputs, progress, other_inputs, None)
            with ranks.failing_together():
                return self._write(out_dir, force, shard_size, hash_inputs, progress and ranks.rank == 0,
                                   other_inputs, ranks)

    def _write(self, out_dir: str | os.PathLike, force: bool, shard_size: int | str, hash_inputs: bool,
               progress: bool, other_inputs: Sequence[str | os.PathLike], ranks: Ranks | None) -> dict[str, Any]:
        from . import __version__  # here: the package defines it after importing this module

        started = time.perf_counter()
        target = check_output_dir(out_dir, force, [*self.input_paths(), *other_inputs])
        max_shard_bytes = parse_size(shard_size)
        rank, world = (ranks.rank, ranks.world_size) if ranks is not None else (0, 1)
        starts = self._rank_starts(world)
        own = range(starts[rank], starts[rank + 1])
        report = {"pyfuse_version": __version__, "torch_version": torch.__version__,
                  "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **self.summary(),
                  "removed_stale_partials": [str(p) for p in remove_stale_partials(target)] if rank == 0 else []}
        timings = {}
        sources = [self.base, *self.models]
        read_before = sum(source.bytes_read for source in sources)
        with PeakRssAnon() as memory, _workers(self.workers) as pool, \
                ShardedWriter(target, self.outputs, max_shard_bytes, starts, rank) as writer, \
                (ranks.failing_together() if ranks is not None else contextlib.nullcontext()):
            if ranks is not None:  # rank 0's writer made the temporary directory every rank writes into
                shared = ranks.sync(writer.path if rank == 0 else None)[0]
                if rank:
                    writer.join(shared)
            digests = {}
            if hash_inputs:
                with timed_range("engine.hash", timings, "hash_s"):
                    files = [path for raw in self.inputs for path in checkpoint_files(raw)][rank::world]
                    digests = dict(zip(map(str, files), (pool.map if pool else map)(sha256_file, files)))
            with timed_range("engine.prepare", timings, "prepare_s"):
                share = (ranks, [self._layout_index[self.outputs[i][0]] for i in own
                                 if self.outputs[i][0] in self._layout_index]) if ranks is not None else None
                tensors = self._tensors(_Reader(self, progress, pool, share), progress, own)
                first = next(tensors, None)  # runs the method's global passes, if any
            with timed_range("engine.merge_write", timings, "merge_s"):
                # a rank may hold no tensors (more ranks than tensors)
                for name, chunks in itertools.chain([first] if first is not None else [], tensors):
                    with nvtx_range(f"engine.tensor:{name}"):
                        writer.write_tensor(name, chunks)
            result = getattr(self.method, "result", None)  # what a data method found: CG residuals, ESM's alpha
            mine = {"rank": rank, "tensors": len(own), "bytes_read": sum(s.bytes_read for s in sources) - read_before,
                    "seconds": time.perf_counter() - started, "peak_rss_anon_bytes": memory.peak}
            everyone = ranks.sync((mine, digests, result)) if ranks is not None else [(mine, digests, result)]
            if rank == 0:
                self._finish_report(report, everyone, ranks)
                self._copy_small_files(writer)
                timings["total_s"] = time.perf_counter() - started
                report["output"] = {"dir": str(Path(out_dir).resolve()), "shards": writer.shard_names,
                                    "tensor_bytes": writer.total_bytes}
                report["timings"] = timings
                report["bytes_read"] = sum(entry["bytes_read"] for entry, _, _ in everyone)  # model tensors
                report["peak_rss_anon_bytes"] = max((entry["peak_rss_anon_bytes"] or 0 for entry, _, _ in everyone),
                                                    default=None) if ranks is not None else memory.peak
                writer.write_file(REPORT_NAME, json.dumps(report, indent=2) + "\n")
                writer.commit()
            if ranks is not None:  # the others return rank 0's report once it has committed
                report = ranks.sync(report if rank == 0 else None)[0]
        return report

    @property
    def _layout_index(self) -> dict[str, int]:
        """Each merged tensor's position in the layout, by name."""
        return {name: s for s, name in enumerate(self.layout.names)}

    def _rank_starts(self, world: int) -> list[int]:
        """Where each rank's run of output tensors starts (and the end): balanced by bytes, or all on rank 0
        for a method that merges the whole model at once (a task-data method, or a data method that overrides
        `merge_model`)."""
        if isinstance(self.method, TaskDataMethod) or (
                isinstance(self.method, DataMethod) and type(self.method).merge_model is not DataMethod.merge_model):
            return [0] + [len(self.outputs)] * world
        sizes = [shape.numel() * torch.empty((), dtype=dtype).element_size() for _, shape, dtype in self.outputs]
        return distributed.split_by_bytes(sizes, world)

    def _finish_report(self, report: dict[str, Any], everyone: list[tuple[dict, dict, Any]],
                       ranks: Ranks | None) -> None:
        """The inputs' digests and the method's result (merged over the ranks) into `report`, and with ranks its
        "distributed" entry."""
        digests = {path: digest for _, found, _ in everyone for path, digest in found.items()}
        for entry, raw in zip(report["inputs"], self.inputs):
            for file, path in zip(entry["files"], checkpoint_files(raw)):
                if str(path) in digests:
                    file["sha256"] = digests[str(path)]
        results = [result for _, _, result in everyone if result]
        if results:
            merged = dict(results[0])
            for result in results[1:]:  # per-tensor tables (MaTS' "solved") hold each rank's own tensors
                for key, value in result.items():
                    if isinstance(value, dict) and isinstance(merged.get(key), dict):
                        merged[key] = {**merged[key], **value}
            report["method_result"] = _jsonable(merged)
        if ranks is not None:
            report["distributed"] = {"world_size": ranks.world_size, "backend": ranks.backend,
                                     "ranks": [entry for entry, _, _ in everyone]}

    def _copy_small_files(self, writer: ShardedWriter) -> None:
        """The base's config, tokenizer and other small files, config.json updated to the output dtype."""
        raw = self.inputs[0]
        if not isinstance(raw, (str, os.PathLike)) or not Path(raw).is_dir():
            return
        merged = set(self.layout.names)
        dtypes = {str(dtype).removeprefix("torch.") for name, _, dtype in self.outputs if name in merged}
        for path in small_files(Path(raw)):
            if path.name == "config.json" and len(dtypes) == 1:
                config, (out_dtype,) = json.loads(path.read_text()), dtypes
                stale = [key for key in ("dtype", "torch_dtype") if key in config and config[key] != out_dtype]
                if stale:  # loaders read the dtype from the config: keep it true to the merged weights
                    config.update(dict.fromkeys(stale, out_dtype))
                    writer.write_file(path.name, json.dumps(config, indent=2) + "\n")
                    continue
            writer.copy_file(path)


def plan_merge(method: str, base, finetuned: Sequence, *, dtype: str | torch.dtype | None = None,
               device: str | torch.device = "cpu", threads: int | None = None,
               chunk_elements: int = CHUNK_ELEMENTS, statistics: Sequence[Statistics | str | os.PathLike] | None = None,
               tasks: Sequence[Task] | None = None, model: torch.nn.Module | None = None,
               allow_nonfinite: bool = False, **params: Any) -> MergePlan:
    """Check a merge completely, from headers only: parameters, keys, shapes, dtypes. Nothing is read or merged.

    `threads` is how many chunks are merged at once (default: torch's CPU threads; 1 on CUDA); a data
    method uses as many torch threads. `statistics`: for data methods only, one `Statistics` or saved
    statistics file per fine-tuned model. `tasks`, `model`: for task-data methods only (regmean++), one
    `pyfuse.Task` per fine-tuned model and the architecture (default: `base`, when it is an `nn.Module`), whose
    values are replaced by the base's. Errors name the model and the key (or the method and the
    parameter, or the statistics, kind and key). When merging, NaN or inf in an input or the result
    raises (naming model or method, tensor and count) unless `allow_nonfinite=True`.
    """
    cls = get_method(method)
    if not issubclass(cls, TaskDataMethod) and (tasks is not None or model is not None):
        raise ValueError(f"{method!r} takes no tasks or model; they are for methods that run the models on the "
                         "tasks' data (regmean++)")
    if issubclass(cls, DataMethod):
        if statistics is None:
            raise ValueError(f"{method!r} needs statistics=[...], one per fine-tuned model, with "
                             f"{', '.join(map(repr, cls.needs))} (see pyfuse.stats.collect_statistics)")
        if isinstance(statistics, (str, os.PathLike, Statistics)) or not isinstance(statistics, Sequence):
            raise ValueError(f"{method}: statistics must be a list, one Statistics or file per fine-tuned model")
        statistics = [st if isinstance(st, Statistics) else Statistics.load(st) for st in statistics]
    elif issubclass(cls, TaskDataMethod):
        if statistics is not None:
            raise ValueError(f"{method!r} runs the models on the tasks' data itself; give tasks=[...], not statistics")
        if tasks is None:
            raise ValueError(f"{method!r} needs tasks=[...], one pyfuse.Task per fine-tuned model, and the model: "
                             "an nn.Module base, or model=...")
        if model is None:
            if not isinstance(base, torch.nn.Module):
                raise ValueError(f"{method!r} runs the model: give the base as an nn.Module, or model=... (the "
                                 "architecture, whose values are replaced by the base's)")
            model = base
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"{method!r}: model must be an nn.Module, got {type(model).__name__}")
    elif not issubclass(cls, StaticMethod):
        raise ValueError(f"{method!r} is not a static merge (it needs data); use its own entry point")
    elif statistics is not None:
        raise ValueError(f"{method!r} is a static merge; it takes no statistics")
    instance = create_method(method, **params)
    out_dtype = parse_dtype(dtype)
    device = resolve_device(device)
    check_device_applies(method, method_kind(cls), device)
    if isinstance(finetuned, (str, os.PathLike, Mapping)) or not isinstance(finetuned, Sequence) or not finetuned:
        raise ValueError("finetuned must be a non-empty list of models (state dicts, modules or paths)")
    if chunk_elements < 1:
        raise ValueError(f"chunk_elements must be positive, got {chunk_elements}")
    if threads is None:
        threads = 1 if device.type == "cuda" else torch.get_num_threads()
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a positive integer, got {threads!r}")
    base_source = open_source(base, _label(base, "base"))
    models = [open_source(m, _label(m, f"fine-tuned model {i + 1}")) for i, m in enumerate(finetuned)]
    layout = FlatLayout.for_models(base_source, models)
    if isinstance(instance, DataMethod):
        instance.check(base_source, models, statistics)
    elif isinstance(instance, TaskDataMethod):
        instance.check_tasks(tasks, len(models))
        for key, value in model.state_dict().items():
            if key not in base_source.specs:
                raise KeyError(f"{method}: the model has a tensor {key!r} that {base_source.label} lacks")
            if base_source.shape(key) != value.shape:
                raise ValueError(f"{method}: tensor {key!r} has shape {list(base_source.shape(key))} in "
                                 f"{base_source.label}, {list(value.shape)} in the model")
        tasks = list(tasks)
    else:
        instance.bind(layout, len(models))
    merged = set(layout.names)
    outputs = [(key, base_source.shape(key),
                (out_dtype or base_source.dtype(key)) if key in merged else base_source.dtype(key))
               for key in base_source.keys()]
    return MergePlan(instance, base_source, models, layout, outputs, device, chunk_elements, threads,
                     [base, *finetuned], statistics, tasks, model, allow_nonfinite)


def merge(method: str, base, finetuned: list, *, dtype: str | torch.dtype | None = None,
          device: str | torch.device = "cpu", threads: int | None = None, progress: bool = False,
          statistics: Sequence[Statistics | str | os.PathLike] | None = None, tasks: Sequence[Task] | None = None,
          model: torch.nn.Module | None = None, **params: Any) -> dict[str, torch.Tensor]:
    """Merge fine-tuned models into one state dict with a static or a data-aware method.

    Args:
        method: "average", "task_arithmetic", "ties", "dare" or "concrete" (see `pyfuse.methods`), or a
            data-aware method such as "fisher" or "regmean", which needs `statistics`, or "regmean++", which
            needs `tasks` and runs the model.
        base: the pre-trained model: a state dict, an `nn.Module`, or a path (a safetensors file, a
            sharded safetensors directory with its index, or a Hugging Face model directory).
        finetuned: the fine-tuned models, in any of the same forms.
        dtype: dtype of the merged tensors (default: the base's); the arithmetic is fp32 regardless.
        device: where the arithmetic runs ("cpu" or "cuda"); the result is on the CPU.
        threads: chunks merged at once (default: torch's CPU threads; torch runs single-threaded meanwhile).
        statistics: data-aware methods only: one `pyfuse.stats.Statistics` (or a file saved by it) per
            fine-tuned model, in the same order.
        tasks: regmean++ only: one `pyfuse.Task` per fine-tuned model, in the same order, whose batches the
            models run on.
        model: regmean++ only: the architecture (its values are replaced by the base's); default: `base`,
            which must then be an `nn.Module`.
        **params: the method's parameters, e.g. `density=0.5` for TIES.

    Returns:
        Every tensor of the base, merged where floating, carried unchanged otherwise. Inputs are never modified.
    """
    return plan_merge(method, base, finetuned, dtype=dtype, device=device, threads=threads, statistics=statistics,
                      tasks=tasks, model=model, **params).state_dict(progress)


def merge_to_dir(method: str, base, finetuned: list, out_dir: str | os.PathLike, *,
                 dtype: str | torch.dtype | None = None, device: str | torch.device = "cpu",
                 threads: int | None = None, force: bool = False, shard_size: int | str = DEFAULT_SHARD_SIZE,
                 hash_inputs: bool = True, progress: bool = False,
                 statistics: Sequence[Statistics | str | os.PathLike] | None = None,
                 tasks: Sequence[Task] | None = None, model: torch.nn.Module | None = None,
                 **params: Any) -> dict[str, Any]:
    """Merge like `merge`, streaming the result into `out_dir` in bounded memory; returns the merge report.

    `out_dir` receives sharded safetensors with their index, the base's config and other small files
    (when the base is a model directory) and `merge_report.json`. It is written under a temporary name
    and renamed when complete; an existing `out_dir` is replaced only with `force=True`.
    """
    plan = plan_merge(method, base, finetuned, dtype=dtype, device=device, threads=threads, statistics=statistics,
                      tasks=tasks, model=model, **params)
    return plan.write(out_dir, force=force, shard_size=shard_size, hash_inputs=hash_inputs, progress=progress)


def _describe(source: TensorSource, raw: Any, role: str) -> dict[str, Any]:
    files = checkpoint_files(raw)
    floats = [key for key in source.keys() if source.dtype(key).is_floating_point]
    return {
        "role": role,
        "label": source.label,
        "path": str(Path(raw).resolve()) if files else None,
        "tensors": len(source.keys()),
        "parameters": sum(source.shape(key).numel() for key in floats),
        "files": [{"name": f.name, "bytes": f.stat().st_size} for f in files],
    }


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _jsonable(v) for key, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, os.PathLike):
        return str(value)
    if isinstance(value, torch.Tensor):
        return f"<tensor {list(value.shape)} {str(value.dtype).removeprefix('torch.')}>"
    return f"<{type(value).__name__}>"
