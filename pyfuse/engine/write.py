"""The engine's writing room: a plan's merged tensors gathered into a state dict, or streamed into sharded
safetensors with their index, the base's small files and the report, committed atomically (distributed:
each rank writes its own shards of one temporary directory, rank 0 commits).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .. import distributed
from .._version import __version__
from ..distributed import Ranks
from ..io.atomic import check_output_dir, remove_stale_temporaries
from ..io.hashing import sha256_file
from ..io.lock import output_lock
from ..io.sources import TensorSource, checkpoint_files
from ..io.writer import ShardedWriter, parse_size, small_files
from ..memory import PeakRssAnon
from ..ops.profiling import nvtx_range, timed_range
from .distributed import own_tensors, rank_starts
from .read import ChunkReader, merged_tensors, workers

if TYPE_CHECKING:  # annotations only: the plan builds on this module
    from .plan import MergePlan

DEFAULT_SHARD_SIZE = "5GB"
REPORT_NAME = "merge_report.json"


def gather(job: MergePlan, progress: bool = False) -> dict[str, torch.Tensor]:
    """Run the merge and return the result in memory (CPU tensors, shaped as the base's)."""
    result = {}
    shapes = {name: (shape, dtype) for name, shape, dtype in job.outputs}
    with workers(job.workers) as pool:
        for name, chunks in merged_tensors(job, ChunkReader(job, progress, pool), progress):
            shape, dtype = shapes[name]
            flat = torch.empty(shape.numel(), dtype=dtype)
            lo = 0
            with nvtx_range(f"engine.tensor:{name}"):
                for chunk in chunks:
                    flat[lo: lo + chunk.numel()].copy_(chunk)
                    lo += chunk.numel()
            result[name] = flat.view(shape)
    return result


def write_to_dir(job: MergePlan, out_dir: str | os.PathLike, *, force: bool = False,
                 shard_size: int | str = DEFAULT_SHARD_SIZE, hash_inputs: bool = True, progress: bool = False,
                 other_inputs: Sequence[str | os.PathLike] = ()) -> dict[str, Any]:
    """Run the merge streaming into `out_dir` (sharded safetensors, the base's small files, a report).

    `out_dir` is checked first (`pyfuse.io.atomic.check_output_dir`): it must not exist unless `force`,
    and may never hold an input (nor `other_inputs`, e.g. the config file). Temporary directories of
    `out_dir` left by killed runs are removed (the report lists them). One run writes `out_dir` at a time
    (`pyfuse.io.lock`), and an input file that changes before the commit fails the merge. Returns the
    report also written to `out_dir/merge_report.json`.

    Under torchrun (or in an initialised `torch.distributed` group), the processes split the output
    tensors, contiguous runs balanced by bytes: each reads, merges and writes its own shards of one
    temporary directory, and rank 0 writes the index and report and commits once every rank is done
    (`pyfuse.distributed`). The tensors are bit-identical to one process's; an error on any rank is
    raised on every rank and nothing is committed. Every rank returns the report.
    """
    with distributed.group(job.device) as ranks:
        if ranks is None:
            with output_lock(out_dir):  # one writer per output, from the first check to the commit
                return _write(job, out_dir, force, shard_size, hash_inputs, progress, other_inputs, None)
        with ranks.failing_together(), output_lock(out_dir) if ranks.rank == 0 else contextlib.nullcontext():
            return _write(job, out_dir, force, shard_size, hash_inputs, progress and ranks.rank == 0,
                          other_inputs, ranks)


def _write(job: MergePlan, out_dir: str | os.PathLike, force: bool, shard_size: int | str, hash_inputs: bool,
           progress: bool, other_inputs: Sequence[str | os.PathLike], ranks: Ranks | None) -> dict[str, Any]:
    started = time.perf_counter()
    rank, world = (ranks.rank, ranks.world_size) if ranks is not None else (0, 1)
    removed = remove_stale_temporaries(out_dir) if rank == 0 else []  # under the lock: only a dead run's are left
    target = check_output_dir(out_dir, force, [*job.input_paths(), *other_inputs])
    max_shard_bytes = parse_size(shard_size)
    starts = rank_starts(job, world)
    own = range(starts[rank], starts[rank + 1])
    report = {"pyfuse_version": __version__, "torch_version": torch.__version__,
              "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **job.summary(),
              "removed_stale_partials": [str(p) for p in removed]}
    timings: dict[str, float] = {}
    sources = [job.base, *job.models]
    read_before = sum(source.bytes_read for source in sources)
    with PeakRssAnon() as memory, workers(job.workers) as pool, \
            ShardedWriter(target, job.outputs, max_shard_bytes, starts, rank) as writer, \
            (ranks.failing_together() if ranks is not None else contextlib.nullcontext()):
        if ranks is not None:  # rank 0's writer made the temporary directory every rank writes into
            shared = ranks.sync(writer.path if rank == 0 else None)[0]
            if rank:
                writer.join(shared)
        digests = _hash_inputs(job, pool, rank, world, timings) if hash_inputs else {}
        share = (ranks, own_tensors(job, own)) if ranks is not None else None
        _stream(job, writer, ChunkReader(job, progress, pool, share), progress, own, timings)
        result = getattr(job.method, "result", None)  # what a data method found: CG residuals, ESM's alpha
        mine = {"rank": rank, "tensors": len(own), "bytes_read": sum(s.bytes_read for s in sources) - read_before,
                "seconds": time.perf_counter() - started, "peak_rss_anon_bytes": memory.peak}
        everyone = ranks.sync((mine, digests, result)) if ranks is not None else [(mine, digests, result)]
        if rank == 0:
            _finish_report(job, report, everyone, ranks)
            _copy_small_files(job, writer)
            timings["total_s"] = time.perf_counter() - started
            report["output"] = {"dir": str(Path(out_dir).resolve()), "shards": writer.shard_names,
                                "tensor_bytes": writer.total_bytes}
            report["timings"] = timings
            report["bytes_read"] = sum(entry["bytes_read"] for entry, _, _ in everyone)  # model tensors
            report["peak_rss_anon_bytes"] = max((entry["peak_rss_anon_bytes"] or 0 for entry, _, _ in everyone),
                                                default=None) if ranks is not None else memory.peak
            writer.write_file(REPORT_NAME, json.dumps(report, indent=2) + "\n")
            for source in sources:  # the hashes and tensors are of the files as they still are
                source.check_unchanged()
            writer.commit()
        if ranks is not None:  # the others return rank 0's report once it has committed
            report = ranks.sync(report if rank == 0 else None)[0]
    return report


def _hash_inputs(job: MergePlan, pool: ThreadPoolExecutor | None, rank: int, world: int,
                 timings: dict[str, float]) -> dict[str, str]:
    """The sha256 of this rank's share of the input files, by path."""
    with timed_range("engine.hash", timings, "hash_s"):
        files = [path for raw in job.inputs for path in checkpoint_files(raw)][rank::world]
        return dict(zip(map(str, files), (pool.map if pool else map)(sha256_file, files)))


def _stream(job: MergePlan, writer: ShardedWriter, reader: ChunkReader, progress: bool, own: Sequence[int],
            timings: dict[str, float]) -> None:
    """This rank's merged tensors into its shards: the method's global passes first ("prepare_s"), then every
    tensor merged and written ("merge_s")."""
    tensors = merged_tensors(job, reader, progress, own)
    with timed_range("engine.prepare", timings, "prepare_s"):
        first = next(tensors, None)  # runs the method's global passes, if any
    with timed_range("engine.merge_write", timings, "merge_s"):
        # a rank may hold no tensors (more ranks than tensors)
        for name, chunks in itertools.chain([first] if first is not None else [], tensors):
            with nvtx_range(f"engine.tensor:{name}"):
                writer.write_tensor(name, chunks)


def _finish_report(job: MergePlan, report: dict[str, Any], everyone: list[tuple[dict, dict, Any]],
                   ranks: Ranks | None) -> None:
    """The inputs' digests and the method's result (merged over the ranks) into `report`, and with ranks its
    "distributed" entry."""
    digests = {path: digest for _, found, _ in everyone for path, digest in found.items()}
    for entry, raw in zip(report["inputs"], job.inputs):
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
        report["method_result"] = jsonable(merged)
    if ranks is not None:
        report["distributed"] = {"world_size": ranks.world_size, "backend": ranks.backend,
                                 "ranks": [entry for entry, _, _ in everyone]}


def _copy_small_files(job: MergePlan, writer: ShardedWriter) -> None:
    """The base's config, tokenizer and other small files, config.json updated to the output dtype."""
    raw = job.inputs[0]
    if not isinstance(raw, (str, os.PathLike)) or not Path(raw).is_dir():
        return
    merged = set(job.layout.names)
    dtypes = {str(dtype).removeprefix("torch.") for name, _, dtype in job.outputs if name in merged}
    for path in small_files(Path(raw)):
        if path.name == "config.json" and len(dtypes) == 1:
            config, (out_dtype,) = json.loads(path.read_text()), dtypes
            stale = [key for key in ("dtype", "torch_dtype") if key in config and config[key] != out_dtype]
            if stale:  # loaders read the dtype from the config: keep it true to the merged weights
                config.update(dict.fromkeys(stale, out_dtype))
                writer.write_file(path.name, json.dumps(config, indent=2) + "\n")
                continue
        writer.copy_file(path)


def describe_input(source: TensorSource, raw: Any, role: str) -> dict[str, Any]:
    """One input of the report: its role, label, path, tensors and parameters, and its files."""
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


def jsonable(value: Any) -> Any:
    """`value` with everything JSON cannot hold written as a short description (paths as strings)."""
    if isinstance(value, dict):
        return {key: jsonable(v) for key, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, os.PathLike):
        return str(value)
    if isinstance(value, torch.Tensor):
        return f"<tensor {list(value.shape)} {str(value.dtype).removeprefix('torch.')}>"
    return f"<{type(value).__name__}>"
