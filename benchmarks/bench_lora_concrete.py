"""LoRA task vectors dense against factored: one outer step of layer-wise Concrete AdaMerging on a Llama-shaped
model with n rank-r LoRA adapters on q, k, v and o, side by side in one run.

    python benchmarks/bench_lora_concrete.py --tasks 8 --rank 16 --json bench_lora_concrete.json

The model is `transformers.LlamaForCausalLM` with a Llama-2-7B block shape scaled down to fit this machine
(defaults: hidden 2048, MLP 5504, 10 layers, 16 heads with as many key/value heads, vocabulary 1024: 510M
parameters, D = 168M; printed with the results), randomly initialised from a fixed seed. Adapter i has random
`A` [r, in] and nonzero `B` [out, r] on every q, k, v, o projection, `lora_alpha` 2r. The task vectors are built
from the adapters by `pyfuse.models.lora_task_vectors` (dense, fp32 `[n, D]`) or `TaskVectors.from_lora`
(factored, fp32), D being the q, k, v, o weights only. Each task's batch is random token ids; its class logits
are the last position's first 10 vocabulary logits. The step: one inner pass on the layer-wise coefficients
(Adam 0.1) and one outer pass on the mask logits (Adam 1e-4), the authors' Flan-T5 learning rates.

Each form runs in a fresh subprocess, one after the other. The child measures its peak RssAnon
(`pyfuse.memory.PeakRssAnon`) from before the model is built to the end of the last timed step, so the model, the
task vectors and every buffer of the step count (glibc's mmap threshold fixed, so freed blocks leave at once). Step
time is wall-clock (CPU time beside it), the median and spread of `--steps` outer steps timed after `--warmup`
untimed ones (the memory window covers them all), without the one-off loading of the op's backend (done
before, on a tiny input). With `--base-on-disk DIR` both forms hold the base in a disk-backed buffer
(`RunOptions.base_on_disk`), whose file pages RssAnon does not count. One more step, under `torch.profiler`, says
where a step's time goes: the fused op's forward and backward, the optimisers, the model's forward and backward (and
the rest). The step-time ratio is printed only when the load and the spread allow (benchmarks/common.py). In both
runs the model's own q, k, v, o weights are made views of the base buffer, since the merged values replace them in
every call (a copy of D floats neither run needs). The child saves the merged parameters after the steps (the
evaluation mask, `loop.merged_flat()`); the parent compares them: `max_rel_diff` is the largest, over tensors, of
max |factored - dense| / max |dense|.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import LoadWatch, print_table, ratios_of, run_provenance, step_breakdown, summary, warn_unreliable, write_json  # noqa: E402,E501,I001

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
CLASSES = 10
KINDS = ("dense", "factored")


def _config(args):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=args.hidden, intermediate_size=args.mlp, num_hidden_layers=args.layers,
                       num_attention_heads=args.heads, num_key_value_heads=args.heads, vocab_size=args.vocab,
                       max_position_embeddings=max(64, args.seq), tie_word_embeddings=False)


def _adapters(model, args):
    """n LoRA adapters (pyfuse's `LoraAdapter`, as read from peft files) on every q, k, v, o projection."""
    from pyfuse.models.lora import LoraAdapter

    targeted = [(name, p.shape) for name, p in model.named_parameters() if name.endswith(
        tuple(f"{t}.weight" for t in TARGETS))]
    adapters = []
    for i in range(args.tasks):
        generator = torch.Generator().manual_seed(1000 + i)
        factors = {}
        for name, (out_features, in_features) in targeted:
            lora_a = torch.randn(args.rank, in_features, generator=generator) / in_features**0.5
            lora_b = torch.randn(out_features, args.rank, generator=generator) * 0.002
            factors[name] = (lora_a, lora_b)
        adapters.append(LoraAdapter(f"adapter {i}", factors, args.rank, 2.0 * args.rank / args.rank))
    return adapters


class _Tokens:
    def __init__(self, seed: int, args):
        self.seed, self.args = seed, args

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed)
        while True:
            yield torch.randint(0, self.args.vocab, (self.args.batch, self.args.seq), generator=generator)


def _warm_up_op() -> None:
    """Load the op's backend and torch's dispatch for both forms on a tiny input (not part of the step)."""
    from pyfuse.ops import LoraFactors, concrete_merge

    offsets = torch.tensor([0, 4])
    factors = LoraFactors.from_segments(offsets, [2], [[(0, torch.ones(2, 1), torch.ones(1, 2), 1.0)]], 1)
    for tv in (torch.ones(1, 4), factors):
        x = torch.zeros(4, requires_grad=True)
        concrete_merge(torch.zeros(4), tv, x, torch.ones(1, 1), offsets, seed=0).sum().backward()


def _timed(loop, t: int, seconds: list[float], cpu_seconds: list[float]) -> None:
    start, cpu_start = time.perf_counter(), time.process_time()
    loop.meta_step(t)
    seconds.append(time.perf_counter() - start)
    cpu_seconds.append(time.process_time() - cpu_start)


def _child(args) -> None:
    import pyfuse
    from pyfuse.adaptive import AdaptiveLoop, RunOptions, Settings
    from pyfuse.memory import PeakRssAnon
    from pyfuse.models.lora import lora_task_vectors

    _warm_up_op()
    from transformers import LlamaForCausalLM

    with PeakRssAnon() as peak:
        torch.manual_seed(0)
        model = LlamaForCausalLM(_config(args)).eval().requires_grad_(False)
        adapters = _adapters(model, args)
        start = time.perf_counter()
        if args.child == "factored":
            tv = pyfuse.TaskVectors.from_lora(model, adapters)
        else:
            tv = lora_task_vectors(model, adapters)
        build_seconds = time.perf_counter() - start
        del adapters
        if args.base_on_disk:
            tv = tv.on_disk(args.base_on_disk)  # the in-memory base goes with the object it replaces
        # The merged values replace these weights in every call: let them share the base's memory.
        parameters = dict(model.named_parameters())
        for name, view in tv.layout.unflatten(tv.base).items():
            parameters[name].data = view
        tasks = [pyfuse.Task(f"task{i}", _Tokens(2000 + i, args),
                             lambda call, ids: call(input_ids=ids).logits[:, -1, :CLASSES])
                 for i in range(args.tasks)]
        settings = Settings(method="concrete_adamerging", coefficients="layer", meta_steps=1, inner_steps=1,
                            inner_lr=0.1, mask_lr=1e-4, eval_mask="relaxed", seed=0)
        loop = AdaptiveLoop(model, tv, tasks, settings, RunOptions(progress=False, backend=args.backend))
        for t in range(max(1, args.warmup)):
            loop.meta_step(t)
        # The timed steps stay inside the memory window: from the second step on, Adam's two [D] moments
        # exist while the model runs, which the first step's peak does not show.
        seconds: list[float] = []
        cpu_seconds: list[float] = []
        for t in range(max(1, args.warmup), max(1, args.warmup) + args.steps):
            _timed(loop, t, seconds, cpu_seconds)
    breakdown = step_breakdown(lambda: loop.meta_step(max(1, args.warmup) + args.steps))
    merged = loop.merged_flat()  # for the comparison only, after the measured window
    torch.save({"merged": merged, "base": tv.base, "offsets": tv.layout.offsets}, args.out)
    print(json.dumps({
        "task_vector_bytes": tv.nbytes, "peak_rss_anon_bytes": peak.peak, "step_seconds": statistics.median(seconds),
        "step_cpu_seconds": statistics.median(cpu_seconds), "step": summary(seconds), "step_cpu": summary(cpu_seconds),
        "breakdown": breakdown,
        "build_seconds": build_seconds, "backend": loop.backend, "base": "disk" if args.base_on_disk else "memory",
        "merged_parameters": tv.layout.numel, "merged_tensors": len(tv.layout),
        "model_parameters": sum(p.numel() for p in model.parameters()), "threads": torch.get_num_threads(),
    }), flush=True)


def _measure(kind: str, args, out: str) -> dict:
    command = [sys.executable, __file__, "--child", kind, "--out", out]
    for key in ("tasks", "rank", "hidden", "mlp", "layers", "heads", "vocab", "batch", "seq", "steps", "warmup",
                "backend"):
        command += [f"--{key}", str(getattr(args, key))]
    # A fixed mmap threshold makes glibc return every large block at once, so RssAnon tracks live tensors (as in
    # bench_concrete_merge.py), not what the allocator kept from the model's initialisation
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    if args.base_on_disk:
        command += ["--base-on-disk", args.base_on_disk]
    with LoadWatch(torch.get_num_threads()) as load:
        done = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True, env=env)
    return {**json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1]), **load.as_dict()}


def _max_rel_diff(factored: dict, dense: dict) -> tuple[float, float]:
    """(max over tensors of max|f - d| / max|d|, max over tensors of max|f - d| / max|d - base|)."""
    bounds = dense["offsets"].tolist()
    of_params = of_updates = 0.0
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        f, d, b = factored["merged"][lo:hi], dense["merged"][lo:hi], dense["base"][lo:hi]
        diff = float((f - d).abs().max())
        of_params = max(of_params, diff / float(d.abs().max()))
        of_updates = max(of_updates, diff / float((d - b).abs().max()))
    return of_params, of_updates


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--mlp", type=int, default=5504)
    parser.add_argument("--layers", type=int, default=10)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=2, help="sequences per task and pass")
    parser.add_argument("--seq", type=int, default=16, help="tokens per sequence")
    parser.add_argument("--steps", type=int, default=5,
                        help="outer steps timed after the warm-up (median and spread; >= 5 for the time ratio)")
    parser.add_argument("--warmup", type=int, default=1,
                        help="untimed outer steps first (inside the memory window, as the timed ones)")
    parser.add_argument("--backend", default="auto", help="the fused op's backend")
    parser.add_argument("--base-on-disk", metavar="DIR",
                        help="both forms hold the base in a disk-backed buffer in DIR (pyfuse.memory.disk_buffer: "
                             "file pages, not anonymous memory; the file is unlinked at once)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--child", choices=KINDS, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.child:
        _child(args)
        return

    results, merged = {}, {}
    with tempfile.TemporaryDirectory() as tmp, LoadWatch(torch.get_num_threads()) as load:
        for kind in KINDS:
            print(f"running {kind} ...", file=sys.stderr, flush=True)
            out = os.path.join(tmp, f"{kind}.pt")
            results[kind] = _measure(kind, args, out)
            merged[kind] = torch.load(out)
    max_rel_diff, max_rel_diff_of_update = _max_rel_diff(merged["factored"], merged["dense"])
    dense, factored = results["dense"], results["factored"]
    ratios, unreliable = ratios_of("factored / dense", factored, dense,
                                   {"step_seconds": "step", "step_cpu_seconds": "step_cpu"}, load.as_dict(),
                                   ("factored", "dense"))
    ratios.update({key: factored[key] / dense[key] for key in ("task_vector_bytes", "peak_rss_anon_bytes")})
    shape = (f"Llama-shaped: hidden {args.hidden}, MLP {args.mlp}, {args.layers} layers, {args.heads} heads "
             f"(as many key/value heads), vocabulary {args.vocab}; {dense['model_parameters'] / 1e6:.0f}M parameters, "
             f"D = {dense['merged_parameters'] / 1e6:.1f}M in {dense['merged_tensors']} q/k/v/o tensors")
    print(f"{shape}; {args.tasks} LoRA adapters of rank {args.rank}; batch {args.batch} x {args.seq} tokens per "
          f"task; one outer step of layer-wise Concrete AdaMerging (1 inner step); backend {dense['backend']}, "
          f"{dense['threads']} thread(s); {args.steps} timed steps after {args.warmup} warm-up (median); load "
          f"average {load.before:.2f} before, {load.after:.2f} after")
    rows = [{"form": kind, **r, "tv_gib": r["task_vector_bytes"] / 2**30,
             "peak_gib": r["peak_rss_anon_bytes"] / 2**30} for kind, r in results.items()]
    rows.append({"form": "factored / dense", "tv_gib": ratios["task_vector_bytes"],
                 "peak_gib": ratios["peak_rss_anon_bytes"], "step_seconds": ratios["step_seconds"],
                 "step_cpu_seconds": ratios["step_cpu_seconds"]})
    for row in rows[:2]:
        row["spread_pct"] = 100 * row["step"]["spread"]
    print_table(rows, [("form", "task vectors", ""), ("tv_gib", "bytes GiB (ratio)", ".4f"),
                       ("peak_gib", "peak RssAnon GiB (ratio)", ".3f"), ("step_seconds", "step s (ratio)", ".3f"),
                       ("spread_pct", "spread %", ".0f"), ("step_cpu_seconds", "step CPU s (ratio)", ".3f")])
    print("Where a step's time goes (one profiled step after the timed ones, seconds):")
    print_table([{"form": kind, **results[kind]["breakdown"]} for kind in KINDS],
                [("form", "task vectors", ""), ("op_forward", "op forward", ".3f"),
                 ("op_backward", "op backward", ".3f"), ("optimiser", "optimiser", ".3f"),
                 ("model_and_rest", "model fwd+bwd, rest", ".3f"), ("profiled_step_seconds", "step", ".3f")])
    warn_unreliable(unreliable)
    print(f"max_rel_diff {max_rel_diff:.2e} (of the merged parameters); {max_rel_diff_of_update:.2e} of the merged "
          f"update (merged - base)")
    write_json(args.json, {
        "benchmark": "lora_concrete", "seeds": {"model": 0, "adapters": "1000 + task", "tokens": "2000 + task",
                                                "mask": 0},
        "dense": dense, "factored": factored, "max_rel_diff": max_rel_diff,
        "max_rel_diff_of_update": max_rel_diff_of_update, "ratios": ratios, "unreliable_ratios": unreliable,
        "model": shape, "load": load.as_dict(), "provenance": run_provenance(__file__, argv, dense["threads"]),
        "settings": {k: getattr(args, k) for k in ("tasks", "rank", "hidden", "mlp", "layers", "heads", "vocab",
                                                   "batch", "seq", "steps", "warmup", "backend", "base_on_disk")},
    })


if __name__ == "__main__":
    main()
