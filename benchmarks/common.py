"""Shared benchmark plumbing: repeated timing with its spread, the machine's load and provenance, ratios that are
only printed when they mean something, peak anonymous memory, the CLIP ViT-B/32 layout, table and JSON output.

A ratio of two times is reported only when both were measured on a quiet enough machine and both repeat well:

- load: the 1-minute load average before the run (other work, since nothing of the run is running yet), and the
  one after less the run's own threads, must not exceed `cores - threads + LOAD_SLACK`: the run's threads would
  otherwise share cores with other work;
- spread: (max - min) / median over the timed repeats of each side must not exceed `SPREAD_LIMIT`, and each side
  needs at least `MIN_REPEATS` repeats (after its warm-up).

Otherwise a warning stating the reason is printed instead, and the JSON holds the value under
`unreliable_ratios` (with the reason) rather than as a ratio.
"""

from __future__ import annotations

import json
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable

import torch

from pyfuse.io.atomic import atomic_path
from pyfuse.memory import PeakRssAnon, rss_anon_bytes  # noqa: F401  (re-exported to the benchmarks)
from pyfuse.provenance import load_average, provenance  # noqa: F401  (re-exported to the benchmarks)

MIN_REPEATS = 5
SPREAD_LIMIT = 0.10  # (max - min) / median of a timed region's repeats
LOAD_SLACK = 0.5  # cores' worth of other load tolerated beside the run's own threads


def run_provenance(script: str, argv: list[str] | None, threads: int | None) -> dict:
    """`pyfuse.provenance.provenance(threads)` with the command as a user types it: `python benchmarks/NAME.py`
    and the arguments `main` was given (`sys.argv[1:]` when None), also when `main(argv)` is called in-process."""
    words = sys.argv[1:] if argv is None else argv
    command = shlex.join(["python", f"benchmarks/{os.path.basename(script)}", *map(str, words)])
    return {**provenance(threads), "command": command}


def summary(seconds: list[float]) -> dict:
    """Median, min, max and relative spread ((max - min) / median) of repeated times, and the samples."""
    median = statistics.median(seconds)
    return {"median": median, "min": min(seconds), "max": max(seconds),
            "spread": (max(seconds) - min(seconds)) / median if median > 0 else 0.0, "samples": list(seconds)}


def repeat_time(fn: Callable[[], object], repeats: int, warmup: int = 1) -> dict:
    """`summary` of `repeats` timed calls of fn after `warmup` untimed ones (fewer than MIN_REPEATS: no ratio)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return summary(times)


class LoadWatch:
    """The 1-minute load average before and after a block (`load_before`, `load_after` in `as_dict()`)."""

    def __init__(self, threads: int):
        self.threads = threads
        self.before = self.after = None

    def __enter__(self) -> LoadWatch:
        self.before = load_average()
        return self

    def __exit__(self, *exc) -> None:
        self.after = load_average()

    def as_dict(self) -> dict:
        return {"load_before": self.before, "load_after": self.after, "threads": self.threads}


def load_problem(load: dict, cores: int | None = None) -> str | None:
    """Why the load of `load` (LoadWatch.as_dict()) makes timings meaningless, or None (see the module docstring)."""
    cores = cores or os.cpu_count() or 1
    threads = load["threads"]
    limit = cores - threads + LOAD_SLACK
    other = max(load["load_before"], (load["load_after"] if load["load_after"] is not None else 0.0) - threads)
    if other > limit:
        return (f"load average {load['load_before']:.2f} before, {load['load_after']:.2f} after: other work "
                f"~{other:.2f} > {limit:.1f} (cores {cores} - threads {threads} + {LOAD_SLACK})")
    return None


def ratio(name: str, numerator: dict, denominator: dict, load: dict, *, invert: bool = False,
          sides: tuple[str, str] = ("numerator", "denominator"), cores: int | None = None
          ) -> tuple[float | None, dict | None]:
    """The ratio of two `summary` medians (denominator / numerator with `invert`, e.g. a speedup), or
    (None, {value, reason}) when the load, too few repeats or either side's spread make it meaningless."""
    value = numerator["median"] / denominator["median"]
    value = 1.0 / value if invert else value
    reasons = []
    for side, timing in zip(sides, (numerator, denominator)):
        if timing["spread"] > SPREAD_LIMIT:
            reasons.append(f"{side} spread {timing['spread']:.0%} > {SPREAD_LIMIT:.0%}")
        if len(timing["samples"]) < MIN_REPEATS:
            reasons.append(f"{side} {len(timing['samples'])} repeats < {MIN_REPEATS}")
    problem = load_problem(load, cores)
    if problem:
        reasons.append(problem)
    if reasons:
        return None, {"value": value, "reason": f"{name}: " + "; ".join(reasons)}
    return value, None


def ratios_of(name: str, numerator: dict, denominator: dict, keys: dict[str, str], load: dict,
              sides: tuple[str, str]) -> tuple[dict, dict]:
    """`ratio` of numerator[timing] to denominator[timing] for each {ratio key: timing key} of `keys`: the ratios
    (None where withheld) and the withheld ones' {value, reason}, both by ratio key."""
    ratios, unreliable = {}, {}
    for key, timing in keys.items():
        ratios[key], problem = ratio(f"{name} {key}", numerator[timing], denominator[timing], load, sides=sides)
        if problem:
            unreliable[key] = problem
    return ratios, unreliable


def warn_unreliable(unreliable: dict) -> None:
    """Prints each unreliable ratio's warning (the ratio itself withheld)."""
    for entry in unreliable.values():
        print(f"WARNING: ratio withheld, {entry['reason']}")


def clip_vit_shapes(hidden: int = 768, layers: int = 12, mlp_ratio: int = 4, patch: int = 32, positions: int = 50):
    """The 199 parameter shapes of Hugging Face's CLIPVisionModel (ViT-B/32 at the defaults), in its order."""
    shapes = [(hidden,), (hidden, 3, patch, patch), (positions, hidden), (hidden,), (hidden,)]
    for _ in range(layers):
        for _ in range(4):  # k, v, q, out projections
            shapes += [(hidden, hidden), (hidden,)]
        shapes += [(hidden,), (hidden,)]
        shapes += [(mlp_ratio * hidden, hidden), (mlp_ratio * hidden,), (hidden, mlp_ratio * hidden), (hidden,)]
        shapes += [(hidden,), (hidden,)]
    shapes += [(hidden,), (hidden,)]
    return shapes


def clip_like_shapes(target_numel: int):
    """199 CLIP-ViT-shaped tensors whose width is scaled so the total is close to `target_numel`."""
    full = sum(torch.Size(s).numel() for s in clip_vit_shapes())
    hidden = max(8, round(768 * (target_numel / full) ** 0.5 / 8) * 8)
    return clip_vit_shapes(hidden=hidden)


def parse_size(text: str) -> int:
    scale = {"K": 10**3, "M": 10**6, "G": 10**9}
    return int(float(text[:-1]) * scale[text[-1].upper()]) if text[-1].upper() in scale else int(text)


def write_json(path: str | None, payload: dict) -> None:
    if not path:
        return
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2))


def print_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    """columns: (key, header, format)."""
    headers = [h for _, h, _ in columns]
    cells = [[("" if r.get(k) is None else format(r[k], f)) for k, _, f in columns] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    print("  ".join(h.rjust(w) for h, w in zip(headers, widths)))
    for c in cells:
        print("  ".join(v.rjust(w) for v, w in zip(c, widths)))


def step_breakdown(run_step: Callable[[], object]) -> dict:
    """Where one step's wall time goes, from a `torch.profiler` run of `run_step` (one step more, after the timed
    ones: the profiler's own overhead stays out of the timings): the fused op's forward and backward, the
    optimisers' steps, and the rest (the model's forward and backward, losses, Python), in seconds."""
    from torch.profiler import ProfilerActivity, profile

    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run_step()
    wall = time.perf_counter() - start
    parts = {"op_forward": 0.0, "op_backward": 0.0, "optimiser": 0.0}
    for event in prof.key_averages():
        if event.key.startswith("pyfuse::"):
            parts["op_backward" if event.key.endswith("_backward") else "op_forward"] += event.cpu_time_total / 1e6
        elif event.key.startswith("Optimizer.step#"):
            parts["optimiser"] += event.cpu_time_total / 1e6
    parts["model_and_rest"] = max(0.0, wall - sum(parts.values()))
    return {"profiled_step_seconds": wall, **parts}
