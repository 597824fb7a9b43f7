"""Running merges in a 2-process gloo group started by `torch.multiprocessing.spawn` (the distributed tests)."""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist


def _worker(rank: int, world: int, store: str, jobs: list[tuple[str, dict[str, Any]]], results: str) -> None:
    import pyfuse

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        for name, kwargs in jobs:
            try:
                outcome = {"report": pyfuse.merge_to_dir(**kwargs)}
            except Exception as err:  # the tests compare every rank's error
                outcome = {"error": f"{type(err).__name__}: {err}"}
            Path(results, f"{name}.{rank}.json").write_text(json.dumps(outcome))
    finally:
        dist.destroy_process_group()


def run_ranks(tmp: Path, jobs: list[tuple[str, dict[str, Any]]], world: int = 2) -> dict[str, list[dict]]:
    """Run `pyfuse.merge_to_dir(**kwargs)` for every (name, kwargs) job, in order, on `world` processes; returns
    per job the outcome of each rank: {"report": ...} or {"error": "..."}."""
    import torch.multiprocessing as mp

    results = tmp / "results"
    results.mkdir()
    mp.spawn(_worker, args=(world, str(tmp / "store"), jobs, str(results)), nprocs=world, join=True)
    return {name: [json.loads((results / f"{name}.{r}.json").read_text()) for r in range(world)]
            for name, _ in jobs}
