"""One outer step of layer-wise Concrete AdaMerging on a CLIP ViT-B/32 vision tower: pyfuse against the
authors' algorithm as they coded it.

    python benchmarks/bench_concrete_step.py --impl both --tasks 8 --batch 16 --steps 5 --json bench.json

The tower is HF `CLIPVisionModel` with the default config (87.5M parameters, 199 tensors), randomly
initialised, with n random task vectors, a fixed random linear head per task and random images. Every
outer step runs the inner pass (coefficients, mask held fixed) and the outer pass (mask logits), each on a
fresh batch per task.

- `eager`: the authors' structure: per-tensor mask logits sampled with `RelaxedBernoulli`, `m / m.mean()`
  per tensor, the merged state dict built by Python loops over tasks and tensors, fp32 task vectors, and
  the n tasks' losses summed before one backward.
- `fused`: pyfuse's `AdaptiveLoop.meta_step`: one fused merge per pass, the tasks' forward/backward one at
  a time into one flat gradient, one fused backward; task vectors in `--vector-dtype` (bf16 by default);
  with `--base-on-disk DIR` the base is a disk-backed buffer (`RunOptions.base_on_disk`: file pages, which
  RssAnon does not count and the kernel may drop under memory pressure), with `--vectors-on-disk DIR` the
  task vectors (`RunOptions.vectors_on_disk`).

Each impl runs in its own subprocess (glibc's mmap threshold fixed, so freed blocks leave at once). The
parent polls /proc/<pid>/status (RssAnon, VmRSS) while it runs; the child resets its VmHWM (via
/proc/self/clear_refs) after setup and reports it after the steps, so both peaks cover the steps only, with
the setup's resident buffers (weights, task vectors) included. Step time is wall-clock, the median and
spread of `--steps` steps after `--warmup` untimed ones; the process's CPU time (all threads) is reported
beside it, being far less disturbed by other load on a shared machine. One more step under `torch.profiler`
says where a step's time goes (the fused op's forward and backward, the optimisers, the model's forward and
backward and the rest). Time ratios are printed only when the load and the spread allow
(benchmarks/common.py); the memory ratios always.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

import torch
from torch.distributions import RelaxedBernoulli
from transformers import CLIPVisionConfig, CLIPVisionModel

import pyfuse
from pyfuse import distributed
from pyfuse.adaptive import AdaptiveLoop, RunOptions, Settings, entropy_loss
from pyfuse.memory import status_bytes

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import LoadWatch, print_table, ratios_of, run_provenance, step_breakdown, summary, warn_unreliable, write_json  # noqa: E402,E501,I001

POLL_SECONDS = 0.02
KIB_PER_GIB = 2**20


# ------------------------------------------------------------------------------------------------
# Child: set up one impl, run the steps, report
# ------------------------------------------------------------------------------------------------
def _kib(nbytes: int | None) -> int | None:
    return None if nbytes is None else nbytes // 1024


class _RandomImages:
    """Endless fresh random image batches from a seeded generator (only the current batch is alive)."""

    def __init__(self, seed: int, batch: int, size: int):
        self.seed, self.batch, self.size = seed, batch, size

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed)
        while True:
            yield torch.randn(self.batch, 3, self.size, self.size, generator=generator)


def tower_config(args) -> CLIPVisionConfig:
    """ViT-B/32 at the defaults (hidden 768, 12 layers, 224-pixel images); smaller for quick runs and tests."""
    return CLIPVisionConfig(hidden_size=args.hidden, intermediate_size=4 * args.hidden, num_hidden_layers=args.layers,
                            num_attention_heads=max(1, args.hidden // 64), image_size=args.image_size)


def _setup(args):
    torch.manual_seed(0)
    model = CLIPVisionModel(tower_config(args)).eval().requires_grad_(False)
    config = model.config
    heads = []
    for i in range(args.tasks):
        torch.manual_seed(100 + i)
        heads.append(torch.nn.Linear(config.hidden_size, args.classes).requires_grad_(False))
    images = [_RandomImages(200 + i, args.batch, config.image_size) for i in range(args.tasks)]
    return model, heads, images


def _fused(args, model, heads, images, ranks=None):
    """`AdaptiveLoop.meta_step` over random task vectors; with `ranks`, built as the rank's shard only (the same
    values as the whole ones' slice: each chunk of `chunk` global elements has its own seed)."""
    layout = pyfuse.FlatLayout.from_module(model)
    segments = (distributed.segment_shards(layout.sizes, ranks.world_size)[ranks.rank] if ranks is not None
                else (0, len(layout)))
    lo, hi = (int(layout.offsets[s]) for s in segments)
    base = layout.flatten(model.state_dict())[lo:hi].clone()
    dtype = getattr(torch, args.vector_dtype)
    vectors = torch.empty(args.tasks, hi - lo, dtype=dtype)
    chunk = 1 << 22
    for i, row in enumerate(vectors):  # filled in chunks so no fp32 [n, D] copy ever exists
        for first in range(lo // chunk * chunk, hi, chunk):
            generator = torch.Generator().manual_seed(1 + i * layout.numel + first)
            values = torch.randn(chunk, generator=generator) * 1e-3
            a, b = max(first, lo), min(first + chunk, hi)
            row[a - lo:b - lo].copy_(values[a - first:b - first])
    names = [f"task{i}" for i in range(args.tasks)]
    tv = pyfuse.TaskVectors(layout, base, vectors, names, shard=segments if ranks is not None else None)
    if args.base_on_disk:
        tv = tv.on_disk(args.base_on_disk)
        base = tv.base  # the in-memory copy is dropped here
    if args.vectors_on_disk:
        tv = tv.on_disk(args.vectors_on_disk, base=False, vectors=True)
    del vectors
    if ranks is None:
        # The merged values replace the model's weights in every call: let them share the base's memory (as the
        # authors' code uses the pre-trained weights themselves as the base), not hold a second copy of D floats.
        parameters = dict(model.named_parameters())
        for name, view in layout.unflatten(base).items():
            parameters[name].data = view

    def task(i):
        head = heads[i]
        return pyfuse.Task(names[i], images[i], lambda call, x: head(call(pixel_values=x).pooler_output))

    settings = Settings(method="concrete_adamerging", coefficients="layer", meta_steps=args.steps, inner_steps=1,
                        eval_mask="relaxed")
    loop = AdaptiveLoop(model, tv, [task(i) for i in range(args.tasks)], settings,
                        RunOptions(progress=False, backend=args.backend))
    return loop.meta_step, {"backend": loop.backend, "vector_dtype": args.vector_dtype,
                            "base": "disk" if args.base_on_disk else "memory",
                            "vectors_in": "disk" if args.vectors_on_disk else "memory",
                            "task_vector_bytes": loop.merger.task_vectors.nbytes, "elements": hi - lo,
                            "numel": layout.numel}


class _EagerConcreteLayerWise:
    """Layer-wise Concrete AdaMerging structured as the authors' code is (see the module docstring)."""

    def __init__(self, model, heads, images, task_vectors, init=0.3, temperature=0.5):
        self.model, self.heads, self.init, self.temperature = model, heads, init, temperature
        self.streams = [iter(x) for x in images]
        self.pretrained = dict(model.named_parameters())
        self.task_vectors = task_vectors
        self.mask_logits = {name: torch.nn.Parameter(torch.zeros_like(p)) for name, p in self.pretrained.items()}
        self.weights = torch.nn.Parameter(torch.full((len(task_vectors), len(self.pretrained)), init))
        self.inner = torch.optim.Adam([self.weights], lr=1.0)
        self.outer = torch.optim.Adam(self.mask_logits.values(), lr=1e-3)

    def sample_mask(self):
        mask = {name: RelaxedBernoulli(self.temperature, logits=x).rsample() for name, x in self.mask_logits.items()}
        return {name: m / m.mean() for name, m in mask.items()}

    def merged_state(self, mask):
        state = dict(self.pretrained)
        for weights, vector in zip(self.weights, self.task_vectors):
            for w, name in zip(weights, self.pretrained):
                state[name] = state[name] + vector[name] * (w * mask[name])
        return state

    def summed_loss(self, state):

        total = 0
        for head, stream in zip(self.heads, self.streams):
            out = torch.func.functional_call(self.model, state, (), {"pixel_values": next(stream)})
            total = total + entropy_loss(head(out.pooler_output))
        return total

    def step(self, t: int) -> float:
        mask = self.sample_mask()
        with torch.no_grad():
            self.weights.fill_(self.init)
        loss = self.summed_loss(self.merged_state({name: m.detach() for name, m in mask.items()}))
        self.inner.zero_grad()
        loss.backward()
        self.inner.step()
        loss = self.summed_loss(self.merged_state(mask))
        self.outer.zero_grad()
        loss.backward()
        self.outer.step()
        return float(loss.detach())


def _eager(args, model, heads, images):
    generator = torch.Generator().manual_seed(1)
    task_vectors = [
        {name: torch.randn(p.shape, generator=generator) * 1e-3 for name, p in model.named_parameters()}
        for _ in range(args.tasks)
    ]
    return _EagerConcreteLayerWise(model, heads, images, task_vectors).step, {"vector_dtype": "float32"}


def _child(args) -> None:
    model, heads, images = _setup(args)
    step, info = (_fused if args.child == "fused" else _eager)(args, model, heads, images)
    setup_anon = _kib(status_bytes("RssAnon"))
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM: the peak reported below is that of the steps
        hwm_reset = True
    except OSError:
        hwm_reset = False
    print(json.dumps({"event": "ready"}), flush=True)
    for t in range(args.warmup):
        step(t)
    times, cpu_times = [], []
    for t in range(args.warmup, args.warmup + args.steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        step(t)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    vmhwm = _kib(status_bytes("VmHWM"))
    print(json.dumps({"event": "profiling"}), flush=True)  # the peaks end here: the profiled step is extra
    breakdown = step_breakdown(lambda: step(args.warmup + args.steps))
    print(json.dumps({
        "event": "done", "step_seconds": times, "step_cpu_seconds": cpu_times, "breakdown": breakdown,
        "setup_rss_anon_kib": setup_anon,
        "vmhwm_kib": vmhwm, "vmhwm_covers": "steps" if hwm_reset else "process",
        "threads": torch.get_num_threads(), "parameters": sum(p.numel() for p in model.parameters()),
        "tensors": len(list(model.parameters())), **info,
    }), flush=True)


# ------------------------------------------------------------------------------------------------
# Parent: one subprocess per impl, polled
# ------------------------------------------------------------------------------------------------
def _measure(impl: str, args) -> dict:
    command = [sys.executable, __file__, "--child", impl, "--tasks", str(args.tasks), "--batch", str(args.batch),
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--classes", str(args.classes),
               "--backend", args.backend, "--vector-dtype", args.vector_dtype, "--hidden", str(args.hidden),
               "--layers", str(args.layers), "--image-size", str(args.image_size)]
    for option in ("base_on_disk", "vectors_on_disk"):
        if getattr(args, option):
            command += [f"--{option.replace('_', '-')}", getattr(args, option)]
    # A fixed mmap threshold makes glibc return every large block at once, so RssAnon tracks live tensors (as in the
    # other benchmarks), not what the allocator kept of freed ones: without it the eager side peaked at 14-18 GiB
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env={**os.environ,
                                                                           "MALLOC_MMAP_THRESHOLD_": "65536"})
    events: dict[str, dict] = {}

    def read():
        for line in proc.stdout:
            if line.startswith("{"):
                event = json.loads(line)
                events[event["event"]] = event

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    peak_anon = peak_rss = 0
    while proc.poll() is None:
        if "ready" in events and "profiling" not in events:  # peaks of the steps (setup buffers resident count)
            peak_anon = max(peak_anon, _kib(status_bytes("RssAnon", proc.pid)) or 0)
            peak_rss = max(peak_rss, _kib(status_bytes("VmRSS", proc.pid)) or 0)
        time.sleep(POLL_SECONDS)
    reader.join()
    if proc.returncode != 0 or "done" not in events:
        raise RuntimeError(f"{impl} run failed (exit code {proc.returncode})")
    done = events["done"]
    seconds, cpu_seconds = done.pop("step_seconds"), done.pop("step_cpu_seconds")
    return {
        "step": summary(seconds),
        "median_step_seconds": summary(seconds)["median"],
        "step_cpu": summary(cpu_seconds),
        "median_step_cpu_seconds": summary(cpu_seconds)["median"],
        "peak_rss_anon_gib": peak_anon / KIB_PER_GIB,
        "peak_vmrss_gib": peak_rss / KIB_PER_GIB,
        "vmhwm_gib": done.pop("vmhwm_kib") / KIB_PER_GIB,
        "setup_rss_anon_gib": done.pop("setup_rss_anon_kib") / KIB_PER_GIB,
        **{k: v for k, v in done.items() if k != "event"},
    }


def add_tower_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hidden", type=int, default=768, help="the tower's width (ViT-B/32: 768)")
    parser.add_argument("--layers", type=int, default=12, help="the tower's encoder layers (ViT-B/32: 12)")
    parser.add_argument("--image-size", type=int, default=224, help="image side in pixels, patches of 32")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--impl", choices=("fused", "eager", "both"), default="both")
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5, help="outer steps timed after the warm-up (>= 5 for ratios)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed outer steps first (inside the peaks)")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--backend", default="auto", help="the fused op's backend (fused impl only)")
    parser.add_argument("--vector-dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"),
                        help="task-vector storage of the fused impl (the eager one keeps fp32, as the authors)")
    parser.add_argument("--base-on-disk", metavar="DIR",
                        help="the fused impl holds its base in a disk-backed buffer in DIR (pyfuse.memory.disk_buffer: "
                             "file pages, not anonymous memory; the file is unlinked at once)")
    parser.add_argument("--vectors-on-disk", metavar="DIR",
                        help="the fused impl holds its task vectors in a disk-backed buffer in DIR (likewise)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--child", choices=("fused", "eager"), help=argparse.SUPPRESS)
    add_tower_options(parser)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.child:
        _child(args)
        return

    impls = ("fused", "eager") if args.impl == "both" else (args.impl,)
    results = {}
    threads = torch.get_num_threads()
    with LoadWatch(threads) as load:
        for impl in impls:
            print(f"running {impl} ...", file=sys.stderr, flush=True)
            with LoadWatch(threads) as own:
                results[impl] = {**_measure(impl, args), **own.as_dict()}
    print(f"CLIP vision tower ({results[impls[0]]['parameters'] / 1e6:.1f}M parameters), {args.tasks} tasks, "
          f"batch {args.batch}, {args.steps} outer steps timed after "
          f"{args.warmup} warm-up (layer-wise Concrete AdaMerging, 1 inner step); peaks over all steps; {threads} "
          f"thread(s); load average {load.before:.2f} before, {load.after:.2f} after")
    rows = [{"impl": impl, "backend": r.get("backend", "-"), "spread_pct": 100 * r["step"]["spread"], **r}
            for impl, r in results.items()]
    print_table(rows, [("impl", "impl", ""), ("backend", "backend", ""), ("vector_dtype", "vectors", ""),
                       ("base", "base", ""), ("vectors_in", "vectors in", ""),
                       ("median_step_seconds", "step s", ".2f"), ("spread_pct", "spread %", ".0f"),
                       ("median_step_cpu_seconds", "step CPU s", ".2f"),
                       ("peak_rss_anon_gib", "RssAnon GiB", ".2f"),
                       ("peak_vmrss_gib", "VmRSS GiB", ".2f"), ("vmhwm_gib", "VmHWM GiB", ".2f"),
                       ("setup_rss_anon_gib", "setup RssAnon GiB", ".2f")])
    print("Where a step's time goes (one profiled step after the timed ones, seconds):")
    print_table([{"impl": impl, **r["breakdown"]} for impl, r in results.items()],
                [("impl", "impl", ""), ("op_forward", "op forward", ".3f"), ("op_backward", "op backward", ".3f"),
                 ("optimiser", "optimiser", ".3f"), ("model_and_rest", "model fwd+bwd, rest", ".3f"),
                 ("profiled_step_seconds", "step", ".3f")])
    ratios, unreliable = None, {}
    if len(results) == 2:
        f, e = results["fused"], results["eager"]
        ratios, unreliable = ratios_of("fused / eager", f, e, {"step_time": "step", "step_cpu_time": "step_cpu"},
                                       load.as_dict(), ("fused", "eager"))
        ratios.update({"peak_rss_anon": f["peak_rss_anon_gib"] / e["peak_rss_anon_gib"],
                       "vmhwm": f["vmhwm_gib"] / e["vmhwm_gib"]})
        print("fused / eager: " + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items() if v is not None))
        warn_unreliable(unreliable)
    write_json(args.json, {
        "benchmark": "concrete_step", "provenance": run_provenance(__file__, argv, threads), "load": load.as_dict(),
        "seeds": {"tower": 0, "heads": "100 + task", "images": "200 + task", "task_vectors": 1, "mask": 0},
        "config": {k: v for k, v in vars(args).items() if k not in ("json", "child")},
        "results": results, "ratios": ratios, "unreliable_ratios": unreliable,
    })


if __name__ == "__main__":
    main()
