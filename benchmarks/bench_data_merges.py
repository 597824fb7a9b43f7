"""Data-aware merges on a CLIP ViT-B/32 vision tower: collecting statistics, every merge's time and memory side
by side, and the convergence of MaTS's conjugate gradient.

    python benchmarks/bench_data_merges.py --json bench_data_merges.json
    python benchmarks/bench_data_merges.py --quick --json quick.json     # a small tower and 3 tasks

The tower is HF `CLIPVisionModel` with the default config (87.5M parameters), randomly initialised (seeded;
nothing is downloaded). Each of the n tasks has a fine-tuned model, the base plus Gaussian noise (std
`NOISE`, seeded per task), a fixed random linear head on the pooled output (so `log p(y|x)` and its gradients
exist) and its own random images. The base and the fine-tuned models are written as safetensors into a work
directory and merged from there, as `pyfuse merge` does: memory-mapped, so weights are file-backed pages and
not anonymous memory.

The parts run in order; each prints a table and adds its section to the JSON, which is rewritten after every
part (another part is added by appending a function to `PARTS`):

1. statistics: every task's "gram_in", "gram_out", "fisher" and "acts", one kind at a time (each on the
   same batches), timed, with the peak RssAnon over the collection; saved into the work directory.
2. merges: task arithmetic and TIES (references), Fisher, RegMean, MaTS with the regmean, kfac and
   diagonal_fisher objectives, ESM at a fixed alpha and ESM++, each by `plan_merge(...).state_dict()`: a first
   run measures the CPU seconds, the peak RssAnon and its rise over the baseline just before the merge (the
   rise includes the merged state dict, which the merge returns); then `--repeats` timed runs give the median
   wall seconds and their spread. (Part 1's spread is over the tasks: the same work on each task's data.)
   MaTS solves the Linear weights of the first
   `--mats-layers` encoder layers and averages the rest: with the kfac objective, one CG step over the whole
   ViT-B/32 costs about 4 TFLOP of float64 for 8 tasks.
3. cg: the residual norm `||b - A x||` of MaTS's conjugate gradient against the step count, for the regmean
   and kfac objectives on a few tensors (by default the middle encoder layer's attention output projection
   and second MLP weight), on the systems MaTS builds (regularised Grams, task-arithmetic start). True
   residuals are evaluated at steps 0, 1, 2, 4, 8, ... and at the last; the solve's seconds leave those out.

The defaults: 8 tasks, 2 batches of 4 images per task, MaTS merges with 5 CG steps on one encoder layer, 12
CG steps in part 3, each merge run `--repeats` + 1 times (`--repeats 1` for a quicker look, its spread then
meaningless). The work directory then holds about 17 GB: 9 models of 350 MB and, per task, 1.7 GB of
statistics (mostly the Grams of the MLP layers).

Memory is RssAnon (`pyfuse.memory.PeakRssAnon`, polled every 20 ms). Before each measurement garbage is
collected and glibc's free heap trimmed, so that the baseline holds only what is alive. Wall seconds suffer
from other load on a shared machine; CPU seconds (all threads of the process) much less.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, CLIPVisionModel

from pyfuse.io.atomic import atomic_path
from pyfuse.io.sources import TensorSource, open_source
from pyfuse.merge import plan_merge
from pyfuse.methods import create_method
from pyfuse.methods.cg import conjugate_gradient
from pyfuse.methods.mats import MaTS, kfac_system, regmean_system, regularize_gram
from pyfuse.stats import KINDS, Statistics, collect_statistics

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import LoadWatch, PeakRssAnon, load_average, print_table, repeat_time, run_provenance, summary, write_json  # noqa: E402,E501

from pyfuse.progress import progress_bar

NOISE = 1e-3  # std of each fine-tuned model's perturbation of the base
CLASSES = 10
ESM_ALPHA = 1.0  # ESM's fixed scale on the merged update (no validation objective here)
MIB = 2**20
QUICK_CONFIG = {"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4, "num_attention_heads": 4}
QUICK_TASKS = 3

MERGES: dict[str, tuple[str, dict[str, Any]]] = {  # label -> (registered method, parameters)
    "task_arithmetic": ("task_arithmetic", {}),
    "ties": ("ties", {}),
    "fisher": ("fisher", {}),
    "regmean": ("regmean", {}),
    "mats[regmean]": ("mats", {"objective": "regmean"}),
    "mats[kfac]": ("mats", {"objective": "kfac"}),
    "mats[diagonal_fisher]": ("mats", {"objective": "diagonal_fisher"}),
    "esm": ("esm", {"alpha": ESM_ALPHA}),
    "esm++": ("esm++", {"alpha": ESM_ALPHA}),
}
CG_OBJECTIVES = {"regmean": ("gram_in",), "kfac": ("gram_in", "gram_out")}


# ------------------------------------------------------------------------------------------------
# The models, tasks and files every part shares
# ------------------------------------------------------------------------------------------------
@dataclass
class Bench:
    """The tower, its tasks, and the files in the work directory; parts add what later parts use."""

    model: CLIPVisionModel
    heads: list[torch.nn.Linear]
    workdir: Path
    base_path: Path
    model_paths: list[Path]
    layers: list[list[str]]  # per encoder layer, in order, its Linear weights' names
    statistics_files: dict[str, list[Path]] = field(default_factory=dict)  # kind -> one file per task

    @property
    def tasks(self) -> int:
        return len(self.model_paths)

    def images(self, task: int, batches: int, batch_size: int) -> list[torch.Tensor]:
        """The task's random images, `batches` batches `[batch_size, 3, S, S]`, the same on every call."""
        generator = torch.Generator().manual_seed(200 + task)
        size = self.model.config.image_size
        return [torch.randn(batch_size, 3, size, size, generator=generator) for _ in range(batches)]

    def logits_fn(self, task: int) -> Callable[[Callable[..., Any], torch.Tensor], torch.Tensor]:
        head = self.heads[task]
        return lambda call, x: head(call(pixel_values=x).pooler_output)

    def statistics(self, kinds: tuple[str, ...], keep: Callable[[str], bool] = lambda name: True) -> list[Statistics]:
        """Per task, one lazy `Statistics` over the saved files of `kinds`, for the parameters `keep` accepts."""
        out = []
        for task in range(self.tasks):
            parts = [Statistics.load(self.statistics_files[kind][task]) for kind in kinds]
            first = parts[0]
            # no fingerprint: each part's covers its own parameters, not the combination's
            out.append(Statistics(
                _combined(kinds, parts, keep, f"statistics of task {task}"), task=first.task,
                examples=first.examples, tokens=first.tokens,
                labels=next((st.labels for st in parts if st.labels), None),
                counts={key: count for st in parts for key, count in st.counts.items()},
                transposed=set().union(*(st.transposed for st in parts))))
        return out


def _combined(kinds: tuple[str, ...], parts: list[Statistics], keep: Callable[[str], bool],
              label: str) -> TensorSource:
    """One lazy source over the files of several one-kind statistics, restricted to the parameters `keep` accepts."""
    sources = {kind: open_source(st.path) for kind, st in zip(kinds, parts)}
    owner = {f"{kind}/{name}": kind for kind, st in zip(kinds, parts) for name in st.names(kind) if keep(name)}
    return TensorSource(label, {key: sources[kind].specs[key] for key, kind in owner.items()},
                        lambda key: sources[owner[key]].get(key))


def _save(tensors: dict[str, torch.Tensor], path: Path) -> Path:
    with atomic_path(path) as tmp:
        save_file({key: value.detach().contiguous() for key, value in tensors.items()}, str(tmp))
    return path


def _config(quick: bool) -> CLIPVisionConfig:
    return CLIPVisionConfig(**QUICK_CONFIG) if quick else CLIPVisionConfig()


def _layers(model: torch.nn.Module) -> list[list[str]]:
    """Per encoder layer, in order, the names of its Linear weights."""
    prefix, layers = next((name, module) for name, module in model.named_modules() if name.endswith("encoder.layers"))
    return [[f"{prefix}.{j}.{name}.weight" for name, module in layer.named_modules()
             if isinstance(module, torch.nn.Linear)] for j, layer in enumerate(layers)]


def _build(args: argparse.Namespace, workdir: Path) -> Bench:
    """The seeded tower and heads, and the base and fine-tuned models written into `workdir`."""
    config = _config(args.quick)
    torch.manual_seed(0)
    model = CLIPVisionModel(config).eval()
    heads = []
    for task in range(args.tasks):
        torch.manual_seed(100 + task)
        heads.append(torch.nn.Linear(config.hidden_size, CLASSES).requires_grad_(False))
    base = {key: value.clone() for key, value in model.state_dict().items()}
    base_path = _save(base, workdir / "base.safetensors")
    model_paths = []
    for task in progress_bar(range(args.tasks), desc="fine-tuned models", disable=not args.progress):
        generator = torch.Generator().manual_seed(1000 + task)
        finetuned = {key: value + NOISE * torch.randn(value.shape, generator=generator)
                     if value.is_floating_point() else value for key, value in base.items()}
        model_paths.append(_save(finetuned, workdir / f"task{task}.safetensors"))
    del base, finetuned
    return Bench(model, heads, workdir, base_path, model_paths, _layers(model))


def _load_into(model: torch.nn.Module, path: Path) -> None:
    source = open_source(path)
    with torch.no_grad():
        for key, value in model.state_dict().items():
            value.copy_(source.get(key))


# ------------------------------------------------------------------------------------------------
# Measuring
# ------------------------------------------------------------------------------------------------
def _settle() -> None:
    """Collect garbage and hand glibc's free heap pages back, so the next baseline is what is alive."""
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the baseline may include freed pages
        pass


@contextmanager
def _measured(record: dict[str, Any]) -> Iterator[None]:
    """Fill `record` with the block's wall and CPU seconds and its peak / baseline / extra RssAnon in MiB."""
    _settle()
    with PeakRssAnon() as memory:
        start, cpu_start = time.perf_counter(), time.process_time()
        yield
        record["seconds"] = time.perf_counter() - start
        record["cpu_seconds"] = time.process_time() - cpu_start
    record["baseline_mib"] = None if memory.start is None else memory.start / MIB
    record["peak_mib"] = None if memory.peak is None else memory.peak / MIB
    record["extra_mib"] = None if memory.extra is None else memory.extra / MIB


def _mean(values: list[float | None]) -> float | None:
    return None if any(v is None for v in values) else sum(values) / len(values)


# ------------------------------------------------------------------------------------------------
# Part 1: statistics
# ------------------------------------------------------------------------------------------------
def statistics_part(args: argparse.Namespace, bench: Bench) -> dict[str, Any]:
    """Collect every task's statistics, one kind at a time; time and memory per (task, kind); files saved."""
    per_kind: dict[str, list[dict[str, Any]]] = {kind: [] for kind in args.kinds}
    bench.statistics_files = {kind: [] for kind in args.kinds}
    for task in range(bench.tasks):
        _load_into(bench.model, bench.model_paths[task])
        batches = bench.images(task, args.batches, args.batch_size)
        for kind in args.kinds:
            record: dict[str, Any] = {"task": task}
            with _measured(record):
                stats = collect_statistics(bench.model, batches, bench.logits_fn(task), kinds=[kind],
                                           name=f"task{task}", progress=args.progress, seed=task)
            path = stats.save(bench.workdir / f"statistics_task{task}_{kind}.safetensors")
            record["stored_mib"] = path.stat().st_size / MIB
            per_kind[kind].append(record)
            bench.statistics_files[kind].append(path)
            del stats
    rows = []
    for kind, records in per_kind.items():
        rows.append({
            "kind": kind, "tasks": len(records),
            "seconds_per_task": _mean([r["seconds"] for r in records]),
            "cpu_seconds_per_task": _mean([r["cpu_seconds"] for r in records]),
            "total_seconds": sum(r["seconds"] for r in records),
            "timing": summary([r["seconds"] for r in records]),
            "peak_mib": max((r["peak_mib"] for r in records if r["peak_mib"] is not None), default=None),
            "extra_mib": max((r["extra_mib"] for r in records if r["extra_mib"] is not None), default=None),
            "stored_mib_per_task": _mean([r["stored_mib"] for r in records]),
            "per_task": records,
        })
    print(f"\nstatistics: {bench.tasks} tasks x {args.batches} batches of {args.batch_size} images, one kind at a "
          f"time; peak / extra RssAnon = the largest over the tasks")
    print_table(rows, [("kind", "kind", ""), ("seconds_per_task", "s/task", ".2f"),
                       ("cpu_seconds_per_task", "CPU s/task", ".2f"), ("total_seconds", "total s", ".1f"),
                       ("peak_mib", "peak MiB", ".0f"), ("extra_mib", "extra MiB", ".0f"),
                       ("stored_mib_per_task", "stored MiB/task", ".1f")])
    return {"statistics": rows}


# ------------------------------------------------------------------------------------------------
# Part 2: the merges
# ------------------------------------------------------------------------------------------------
def _needs(method: str, params: dict[str, Any]) -> tuple[str, ...]:
    return tuple(create_method(method, **params).needs)


def _summary(result: dict[str, Any]) -> dict[str, Any]:
    """The JSON-worthy part of a data method's `result`: MaTS's CG residuals summarised, ESM's alpha and counts."""
    summary: dict[str, Any] = {}
    if "solved" in result:
        solved = result["solved"].values()
        relative = [s["residual_after"] / s["rhs_norm"] for s in solved if s["rhs_norm"] > 0]
        summary.update(solved_tensors=len(result["solved"]),
                       cg_iterations=max((s["iterations"] for s in solved), default=0),
                       max_relative_residual=max(relative, default=None))
    if "alpha" in result:
        summary.update(alpha=result["alpha"], esm_tensors=len(result["esm"]), tsv_tensors=len(result["tsv"]))
    if "experts" in result:
        summary["experts"] = result["experts"]
    return summary


def merges_part(args: argparse.Namespace, bench: Bench) -> dict[str, Any]:
    """Every merge in `args.merges` from the files, one after another, each timed and measured."""
    solved = {name for layer in bench.layers[:args.mats_layers] for name in layer}
    rows = []
    for label in progress_bar(args.merges, desc="merges", disable=not args.progress):
        method, params = MERGES[label]
        needs = _needs(method, params)
        if method == "mats":
            params = {**params, "iterations": args.mats_iterations}
        statistics = None
        if needs:
            statistics = bench.statistics(needs, solved.__contains__ if method == "mats" else lambda name: True)
        record: dict[str, Any] = {"merge": label, "method": method, "parameters": params}
        with _measured(record):  # memory, and the warm-up of the timed repeats
            plan = plan_merge(method, bench.base_path, bench.model_paths, statistics=statistics, **params)
            merged = plan.state_dict(progress=args.progress)
        record["output_mib"] = sum(t.numel() * t.element_size() for t in merged.values()) / MIB
        record.update(_summary(getattr(plan.method, "result", None) or {}))
        del plan, merged
        _settle()

        def merge(method=method, params=params, statistics=statistics) -> None:
            plan_merge(method, bench.base_path, bench.model_paths, statistics=statistics, **params).state_dict(
                progress=False)

        record["first_seconds"] = record.pop("seconds")
        record["timing"] = repeat_time(merge, args.repeats, warmup=0)
        record["seconds"] = record["timing"]["median"]
        record["spread"] = record["timing"]["spread"]
        del statistics
        rows.append(record)
    layers = f"{args.mats_layers} of {len(bench.layers)}"
    print(f"\nmerges of {bench.tasks} models ({sum(p.numel() for p in bench.model.parameters()) / 1e6:.1f}M "
          f"parameters each, read from safetensors); extra = peak RssAnon - RssAnon before the merge, merged "
          f"state dict included; MaTS: CG ({args.mats_iterations} steps) on the Linear weights of {layers} "
          f"encoder layers; s = median of {args.repeats} timed runs after the measured first one (its CPU s, "
          f"memory), spread = (max - min) / median")
    print_table(rows, [("merge", "merge", ""), ("seconds", "s", ".2f"), ("spread", "spread", ".0%"),
                       ("cpu_seconds", "CPU s", ".2f"),
                       ("peak_mib", "peak MiB", ".0f"), ("extra_mib", "extra MiB", ".0f"),
                       ("output_mib", "output MiB", ".0f"), ("solved_tensors", "CG tensors", "d"),
                       ("max_relative_residual", "max |r|/|b|", ".2e")])
    return {"merges": rows, "mats_layers": args.mats_layers, "mats_iterations": args.mats_iterations}


# ------------------------------------------------------------------------------------------------
# Part 3: CG convergence
# ------------------------------------------------------------------------------------------------
def _checkpoints(iterations: int) -> list[int]:
    """Steps whose true residual is evaluated: 0, the powers of two below `iterations`, and `iterations`."""
    steps = {0, iterations}
    step = 1
    while step < iterations:
        steps.add(step)
        step *= 2
    return sorted(steps)


def cg_part(args: argparse.Namespace, bench: Bench) -> dict[str, Any]:
    """MaTS's CG on chosen tensors: the true residual norm at checkpoint steps, per objective and tensor."""
    objectives = [o for o, kinds in CG_OBJECTIVES.items() if all(k in args.kinds for k in kinds)]
    if args.cg_iterations == 0 or not objectives:
        print("\ncg: skipped (" + ("--cg-iterations 0" if objectives else "needs gram_in statistics") + ")")
        return {"cg": []}
    strength = MaTS.params["regularization"].default
    scaling = MaTS.params["init_scaling"].default
    steps = _checkpoints(args.cg_iterations)
    rows = []
    for name in args.cg_tensors:
        base = open_source(bench.base_path).get(name).double()
        thetas = [open_source(path).get(name).double() for path in bench.model_paths]
        start = base + scaling * sum(theta - base for theta in thetas)  # MaTS's default: task arithmetic
        for objective in objectives:
            statistics = bench.statistics(CG_OBJECTIVES[objective], {name}.__contains__)
            grams = [[regularize_gram(st.get(kind, name).double(), strength) for st in statistics]
                     for kind in CG_OBJECTIVES[objective]]
            apply, rhs, dims = regmean_system(grams[0], thetas) if objective == "regmean" else \
                kfac_system(grams[0], grams[1], thetas)
            residuals: dict[int, float] = {}
            spent = [0.0]

            def evaluate(step: int, x: torch.Tensor, apply=apply, rhs=rhs, residuals=residuals,
                         spent=spent) -> None:
                if step in steps and step != args.cg_iterations:  # the last one comes with the result
                    tick = time.perf_counter()
                    residuals[step] = float(torch.linalg.vector_norm(rhs - apply(x)))
                    spent[0] += time.perf_counter() - tick

            tick = time.perf_counter()
            solved = conjugate_gradient(apply, rhs, start, iterations=args.cg_iterations, dims=dims,
                                        callback=evaluate)
            seconds = time.perf_counter() - tick - spent[0]
            residuals[0], residuals[solved.iterations] = solved.residual_before, solved.residual_after
            rows.append({
                "objective": objective, "tensor": name, "shape": list(base.shape), "iterations": solved.iterations,
                "seconds": seconds, "rhs_norm": solved.rhs_norm,
                "residuals": [{"iteration": k, "residual": residuals[k],
                               "relative": residuals[k] / solved.rhs_norm if solved.rhs_norm else None}
                              for k in sorted(residuals)],
            })
            del statistics, grams, apply, rhs, solved
    print(f"\ncg: MaTS's conjugate gradient, ||b - A x|| / ||b|| after k steps ({bench.tasks} tasks, Grams "
          f"regularised {strength}, task-arithmetic start {scaling}); s = the solve without the extra evaluations")
    table = [{"objective": r["objective"], "tensor": r["tensor"], "shape": "x".join(map(str, r["shape"])),
              "seconds": r["seconds"], **{f"r{p['iteration']}": p["relative"] for p in r["residuals"]}}
             for r in rows]
    print_table(table, [("objective", "objective", ""), ("tensor", "tensor", ""), ("shape", "shape", ""),
                        ("seconds", "s", ".2f"), *((f"r{k}", f"k={k}", ".2e") for k in steps)])
    return {"cg": rows}


PARTS: list[Callable[[argparse.Namespace, Bench], dict[str, Any]]] = [statistics_part, merges_part, cg_part]
"""The benchmark's parts, run in this order: each prints its table and returns its JSON section."""


def embedded_accuracy(args: argparse.Namespace) -> dict[str, Any]:
    """`--embedded`: the data-aware merges next to task arithmetic and TIES on the embedded real benchmark
    (all-MiniLM-L6-v2 fine-tuned on the shipped text tasks, cached), through `pyfuse.demo.run_demo`."""
    from pyfuse.cli import demo_table
    from pyfuse.demo import DATA_METHODS, DemoSettings, run_demo

    settings = DemoSettings(methods=("task_arithmetic", "ties", *DATA_METHODS), seeds=tuple(args.seeds))
    with _workspace(args.workdir) as workdir:
        report = run_demo(settings, workdir / "embedded", progress=args.progress,
                          log=lambda message: print(message, file=sys.stderr, flush=True))
    print(demo_table(report))
    # the demo's report as written (its own provenance included), less the adaptive methods' curves (none here)
    return {"embedded": {key: value for key, value in report.items() if key != "curves"}}


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------
def _names(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"a small tower ({', '.join(f'{k}={v}' for k, v in QUICK_CONFIG.items())}) and "
                             f"{QUICK_TASKS} tasks, for smoke tests")
    parser.add_argument("--tasks", type=int, help=f"fine-tuned models (default 8; {QUICK_TASKS} with --quick)")
    parser.add_argument("--batches", type=int, default=2, help="batches of images per task for the statistics")
    parser.add_argument("--batch-size", type=int, default=4,
                        help="images per batch (the Fisher's cost grows with its square: one backward per example "
                             "through the whole batch's graph)")
    parser.add_argument("--kinds", type=_names, default=list(KINDS),
                        help=f"statistics to collect, comma-separated among {','.join(KINDS)} (default: all)")
    parser.add_argument("--merges", type=_names,
                        help=f"comma-separated among {','.join(MERGES)} (default: all the collected kinds allow)")
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed runs of each merge after its first (measured for memory), median and spread")
    parser.add_argument("--mats-iterations", type=int, default=5, help="CG steps per tensor in the MaTS merges")
    parser.add_argument("--mats-layers", default="1",
                        help="MaTS solves the Linear weights of this many first encoder layers, or 'all' (the "
                             "rest is averaged)")
    parser.add_argument("--cg-iterations", type=int, default=12, help="CG steps of the convergence part (0: skip)")
    parser.add_argument("--cg-tensors", type=_names,
                        help="tensors of the convergence part, comma-separated (default: the middle encoder "
                             "layer's self_attn.out_proj.weight and mlp.fc2.weight)")
    parser.add_argument("--workdir", help="keep the models and statistics here (default: a temp dir, removed)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    parser.add_argument("--json", help="write the results here (rewritten after every part)")
    parser.add_argument("--embedded", action="store_true",
                        help="instead: the accuracy table of the data-aware merges on the embedded real benchmark")
    parser.add_argument("--seeds", default="0",
                        help="--embedded: comma-separated seeds of the stochastic merges (their sampled statistics)")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options, checked (errors name the option and the offending value) before any work."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.seeds = [int(seed) for seed in _names(args.seeds)]
    except ValueError:
        parser.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    if not args.seeds:
        parser.error("--seeds: give at least one seed")

    if args.tasks is None:
        args.tasks = QUICK_TASKS if args.quick else 8
    for option in ("tasks", "batches", "batch_size", "repeats"):
        if getattr(args, option) < 1:
            parser.error(f"--{option.replace('_', '-')} must be at least 1, got {getattr(args, option)}")
    for option in ("mats_iterations", "cg_iterations"):
        if getattr(args, option) < 0:
            parser.error(f"--{option.replace('_', '-')} must be >= 0, got {getattr(args, option)}")
    unknown = [kind for kind in args.kinds if kind not in KINDS]
    if unknown or not args.kinds or len(set(args.kinds)) != len(args.kinds):
        parser.error(f"--kinds must be distinct names among {', '.join(KINDS)}, got {','.join(args.kinds)}")
    available = [label for label, (method, params) in MERGES.items()
                 if all(kind in args.kinds for kind in _needs(method, params))]
    if args.merges is None:
        args.merges = available
    for label in args.merges:
        if label not in MERGES:
            parser.error(f"--merges: unknown merge {label!r}; choose among {', '.join(MERGES)}")
        missing = [kind for kind in _needs(*MERGES[label]) if kind not in args.kinds]
        if missing:
            parser.error(f"--merges: {label} needs {', '.join(missing)} statistics, which --kinds leaves out")
    with torch.device("meta"):  # names and shapes only, nothing allocated
        layers = _layers(CLIPVisionModel(_config(args.quick)))
    if args.mats_layers == "all":
        args.mats_layers = str(len(layers))
    if not args.mats_layers.isdigit() or not 1 <= int(args.mats_layers) <= len(layers):
        parser.error(f"--mats-layers must be 'all' or 1..{len(layers)}, got {args.mats_layers!r}")
    args.mats_layers = int(args.mats_layers)
    middle = layers[len(layers) // 2]
    if args.cg_tensors is None:
        args.cg_tensors = [name for name in middle if name.endswith(("self_attn.out_proj.weight", "mlp.fc2.weight"))]
    linear = {name for layer in layers for name in layer}
    for name in args.cg_tensors:
        if name not in linear:
            parser.error(f"--cg-tensors: {name!r} is not a Linear weight of the tower (e.g. {middle[0]!r})")
    return args


@contextmanager
def _workspace(path: str | None) -> Iterator[Path]:
    if path is not None:
        Path(path).mkdir(parents=True, exist_ok=True)
        yield Path(path)
        return
    with tempfile.TemporaryDirectory(prefix="bench_data_merges.") as tmp:
        yield Path(tmp)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run every part in `PARTS`; returns (and writes to `--json`) the results."""
    args = parse_args(argv)
    threads = torch.get_num_threads()
    with LoadWatch(threads) as load:
        results: dict[str, Any] = {
            "benchmark": "data_merges", "provenance": run_provenance(__file__, argv, threads),
            "config": {k: v for k, v in vars(args).items() if k not in ("json", "workdir", "progress")},
            "seeds": {"models": "1000 + task", "heads": "100 + task", "images": "200 + task", "statistics": "task"},
        }

        def write() -> None:
            results["load"] = {**load.as_dict(), "load_after": load_average()}
            write_json(args.json, results)

        if args.embedded:
            results["seeds"] = {"merges": list(args.seeds)}
            results.update(embedded_accuracy(args))
            write()
            return results
        with _workspace(args.workdir) as workdir:
            bench = _build(args, workdir)
            results["model"] = {"parameters": sum(p.numel() for p in bench.model.parameters()),
                                "tensors": len(list(bench.model.parameters())), "layers": len(bench.layers),
                                "hidden_size": bench.model.config.hidden_size, "noise": NOISE, "classes": CLASSES}
            print(f"CLIP vision tower: {results['model']['parameters'] / 1e6:.1f}M parameters, "
                  f"{bench.tasks} tasks, work directory {workdir}", file=sys.stderr, flush=True)
            for part in PARTS:
                results.update(part(args, bench))
                write()
    return results


if __name__ == "__main__":
    main()
