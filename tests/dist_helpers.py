"""Running code in a 2-process gloo group started by `torch.multiprocessing.spawn` (the distributed tests)."""

from __future__ import annotations

import contextlib
import datetime
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from pyfuse.device import torch_threads

RANK_THREADS = 1
"""Threads per rank, and for the one-process reference: bit-identity holds at equal thread counts (a
multi-threaded kernel's float sums depend on how the work is split)."""


def rank_threads() -> contextlib.AbstractContextManager:
    """Run the one-process reference with the ranks' thread count."""
    return torch_threads(RANK_THREADS)


def _worker(rank: int, world: int, store: str, fn: Callable[..., Any], args: tuple, results: str) -> None:
    torch.set_num_threads(RANK_THREADS)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        torch.save(fn(*args), Path(results, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_ranks(tmp: Path, fn: Callable[..., Any], *args: Any, world: int = 2) -> list[Any]:
    """`fn(*args)` (a module-level function) on each of `world` processes of one gloo group; their results."""
    import torch.multiprocessing as mp

    results = tmp / "results"
    results.mkdir()
    mp.spawn(_worker, args=(world, str(tmp / "store"), fn, args, str(results)), nprocs=world, join=True)
    return [torch.load(results / f"{rank}.pt", weights_only=False) for rank in range(world)]


def _alone(index: int, fn: Callable[..., Any], args: tuple, result: str) -> None:
    torch.set_num_threads(RANK_THREADS)
    torch.save(fn(*args), result)


def run_alone(tmp: Path, fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(*args)` in one fresh spawned process, no process group: the one-process reference, started the way
    the ranks are (a process the suite's earlier tests have not touched)."""
    import torch.multiprocessing as mp

    result = tmp / "alone.pt"
    mp.spawn(_alone, args=(fn, args, str(result)), nprocs=1, join=True)
    return torch.load(result, weights_only=False)


def merge_jobs(jobs: list[tuple[str, dict[str, Any]]]) -> dict[str, dict]:
    """`pyfuse.merge_to_dir(**kwargs)` per (name, kwargs), in order: {"report": ...} or {"error": "Type: ..."}."""
    import pyfuse

    outcomes = {}
    for name, kwargs in jobs:
        try:
            outcomes[name] = {"report": pyfuse.merge_to_dir(**kwargs)}
        except Exception as err:  # the tests compare every rank's error
            outcomes[name] = {"error": f"{type(err).__name__}: {err}"}
    return outcomes
