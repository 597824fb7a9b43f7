"""The fused Concrete merge (C++ backend) against the authors' eager per-tensor formula, side by side.

For n task vectors over a CLIP-ViT-shaped layout (199 tensors; ViT-B/32 itself at D = 87.5M), each
implementation runs in its own worker process (so memory is measured alike) and reports forward time,
forward+backward time, extra peak anonymous memory beyond inputs and outputs, and the forward's
effective bandwidth against a `copy_` measured in the same worker; for the fused op also each phase
alone (mask sampling, apply, backward accumulate, backward logits) with its bandwidth, which says where
the time beyond a copy goes. Every time is the median of `--repeats` after a warm-up, with its spread;
ratios are withheld with a warning when load or spread make them meaningless (benchmarks/common.py).
Also prints the Triton kernel's expected H100 time from its bytes moved (an estimate, not a measurement:
no GPU here).

    python benchmarks/bench_concrete_merge.py --sizes 1M,8M,87.5M --tasks 8 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    LoadWatch,
    PeakRssAnon,
    clip_like_shapes,
    parse_size,
    print_table,
    ratio,
    repeat_time,
    run_provenance,
    warn_unreliable,
    write_json,
)

H100_HBM_BYTES_PER_S = 3.35e12
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def make_inputs(numel: int, n: int, dtype: torch.dtype):
    shapes = clip_like_shapes(numel)
    sizes = [torch.Size(s).numel() for s in shapes]
    offsets = torch.tensor([0, *sizes]).cumsum(0)
    D = int(offsets[-1])
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(D, generator=gen)
    tv = (torch.randn(n, D, generator=gen) * 0.01).to(dtype)
    logits = torch.randn(D, generator=gen)
    weights = torch.full((n, len(shapes)), 0.3)
    grad = torch.randn(D, generator=gen)
    return shapes, offsets, base, tv, logits, weights, grad


def fused_impl(backend: str):
    from pyfuse.ops import concrete_merge

    def run(shapes, offsets, base, tv, logits, weights, grad, backward):
        x = logits.requires_grad_(backward)
        w = weights.requires_grad_(backward)
        out = concrete_merge(base, tv, x, w, offsets, seed=0, step=1, temperature=0.5, backend=backend)
        if backward:
            out.backward(grad)
            return [out, x.grad, w.grad]
        return [out]

    return run


def eager_run(shapes, offsets, base, tv, logits, weights, grad, backward):
    """The authors' formula: per tensor, a RelaxedBernoulli mask, m / m.mean(), and a loop over tasks."""
    x = logits.requires_grad_(backward)
    w = weights.requires_grad_(backward)
    bounds = offsets.tolist()
    outs = []
    for s, shape in enumerate(shapes):
        lo, hi = bounds[s], bounds[s + 1]
        m = torch.distributions.RelaxedBernoulli(torch.tensor(0.5, device=x.device),
                                                 logits=x[lo:hi].view(shape)).rsample()
        m = m / m.mean()
        merged = base[lo:hi].view(shape)
        for i in range(tv.shape[0]):
            merged = merged + w[i, s] * (m * tv[i, lo:hi].view(shape).float())
        outs.append(merged)
    if backward:
        torch.autograd.backward(outs, [grad[bounds[s]:bounds[s + 1]].view(sh) for s, sh in enumerate(shapes)])
        return [*outs, x.grad, w.grad]
    return outs


def phase_timings(args, inputs) -> dict:
    """Each forward and backward phase of the fused op timed alone, into buffers that already exist (as `copy_`
    writes into one), so the op's time splits into mask sampling, apply, backward accumulate, backward logits."""
    from pyfuse.ops import backends
    from pyfuse.ops.masked_merge import _segment_scale

    shapes, offsets, base, tv, logits, weights, grad = inputs
    phases = backends.phases(args.impl.removeprefix("pyfuse-"))
    D, x, w = base.numel(), logits.detach(), weights.detach()
    out, ga = torch.empty(D), torch.empty(D)
    seg_sum = phases.mask_sums(x, offsets, 0, 1, 0.5, 0, out)
    scale = _segment_scale(seg_sum, offsets, True)
    corr = torch.zeros(len(shapes))
    runs = {
        "mask_sums": lambda: phases.mask_sums(x, offsets, 0, 1, 0.5, 0, out),
        "merge_apply": lambda: phases.merge_apply(base, tv, w, offsets, scale, out),
        "backward_accumulate": lambda: phases.backward_accumulate(grad, tv, x, w, offsets, scale, 0, 1, 0.5, 0, ga),
        "backward_logits": lambda: phases.backward_logits(ga, x, offsets, scale, corr, 0, 1, 0.5),
    }
    # bytes each phase must move once: fp32 [D] streams plus the task vectors
    f32, tv_bytes = D * 4, tv.nbytes
    moved = {"mask_sums": 2 * f32, "merge_apply": 3 * f32 + tv_bytes, "backward_accumulate": 3 * f32 + tv_bytes,
             "backward_logits": 3 * f32}
    return {name: {**repeat_time(run, args.repeats), "bytes": moved[name]} for name, run in runs.items()}


def noise_timing(args, D: int) -> dict | None:
    """The Philox uniforms of all D elements alone (the SPEC's noise: one Philox4x32-10 per element and step, the
    same in every backend), in chunks of 2^20 so that allocating them costs little: the floor under the mask
    sampling that no rewrite of the mask's arithmetic removes. None for a backend without `uniform`."""
    from pyfuse.ops import backends

    phases = backends.phases(args.impl.removeprefix("pyfuse-"))
    if not hasattr(phases, "uniform"):
        return None
    chunk = 1 << 20

    def run():
        for start in range(0, D, chunk):
            phases.uniform(0, 1, start, min(chunk, D - start))
    return repeat_time(run, args.repeats)


def worker(args) -> dict:
    torch.set_num_threads(args.threads)
    impl = eager_run if args.impl == "eager" else fused_impl(args.impl.removeprefix("pyfuse-"))
    inputs = make_inputs(args.size, args.tasks, DTYPES[args.dtype])
    shapes, offsets, base, tv, logits, weights, grad = inputs
    D, n = base.numel(), tv.shape[0]

    def reset():
        logits.grad = None
        weights.grad = None

    if args.measure == "memory":
        # one tiny call first, so one-off imports and registrations are not counted as the op's memory
        impl(*make_inputs(10_000, n, DTYPES[args.dtype]), backward=True)
        with PeakRssAnon(interval=0.0005) as peak:
            results = impl(*inputs, backward=True)
        outputs = sum(t.nbytes for t in results)
        return {"extra_peak_mb": max(0, peak.extra - outputs) / 2**20}
    src, dst = torch.randn(D), torch.empty(D)
    with LoadWatch(args.threads) as load:
        copy = repeat_time(lambda: dst.copy_(src), args.repeats)
        with torch.no_grad():
            fwd = repeat_time(lambda: impl(*inputs, backward=False), args.repeats)
        fwd_bwd = repeat_time(lambda: (reset(), impl(*inputs, backward=True)), args.repeats)
        phases = phase_timings(args, inputs) if args.impl != "eager" else {}
        noise = noise_timing(args, D) if args.impl != "eager" else None
    triton_fwd_bytes = D * 4 * 5 + tv.nbytes  # + the mask written and re-read through the output buffer
    triton_bwd_bytes = D * 4 * 6 + tv.nbytes  # grad, logits (x2), base-free; ga written and re-read
    return {
        "impl": args.impl, "D": D, "n": n, "tensors": len(shapes), "dtype": args.dtype, "threads": args.threads,
        "copy": copy, "fwd": fwd, "fwd_bwd": fwd_bwd, "phases": phases, "noise": noise, "worker_load": load.as_dict(),
        "fwd_bytes": D * 4 * 3 + tv.nbytes,  # read base, logits, task vectors once; write out once
        "bwd_bytes": D * 4 * 3 + tv.nbytes,  # read grad, logits, task vectors once; write the logits' gradient once
        "copy_bytes": 2 * D * 4,
        "h100_fwd_estimate_ms": triton_fwd_bytes / H100_HBM_BYTES_PER_S * 1e3,
        "h100_fwd_bwd_estimate_ms": (triton_fwd_bytes + triton_bwd_bytes) / H100_HBM_BYTES_PER_S * 1e3,
    }


def fraction_of_copy(key: str, name: str, row: dict, timing: dict, nbytes: int, load: dict,
                     unreliable: dict) -> float | None:
    """(nbytes / time) / copy bandwidth, i.e. copy_time / time scaled by the bytes: None (and a warning entry under
    `key`) when the two times are not comparable."""
    value, problem = ratio(name, row["copy"], timing, load, sides=("copy_", name.rsplit(" ", 1)[-1].split("/")[0]))
    scale = nbytes / row["copy_bytes"]
    if problem:
        unreliable[key] = {**problem, "value": problem["value"] * scale}
        return None
    return value * scale


def mask_share(row: dict, load: dict) -> None:
    """Prints the mask sampling's cost per element and thread, and its share of the forward phases (the forward
    samples the mask once, the backward twice: in accumulate and again in logits)."""
    ph = row["phases"]
    per_element = ph["mask_sums"]["median"] / row["D"] * row["threads"] * 1e9
    forward = {"median": ph["mask_sums"]["median"] + ph["merge_apply"]["median"],
               "spread": max(ph["mask_sums"]["spread"], ph["merge_apply"]["spread"]),
               "samples": ph["mask_sums"]["samples"]}
    share, problem = ratio(f"{row['impl']} D={row['D']:,} mask share of the forward", ph["mask_sums"], forward, load,
                           sides=("mask_sums", "forward phases"))
    text = f"{share:.0%} of the forward phases" if share is not None else "its share withheld (see the warnings)"
    if problem:
        row["unreliable_ratios"]["mask_share_of_forward"] = problem
    print(f"{row['impl']} D={row['D']:,}: mask sampling (Philox, then log, log1p, exp per element) costs "
          f"{per_element:.1f} ns per element and thread, {text}; the backward samples it twice.")
    if row.get("noise"):
        # the noise's time over what the whole forward may take at 70 % of copy_'s bandwidth (issue 27's target)
        per_copy, problem = ratio(f"{row['impl']} D={row['D']:,} noise/copy", row["noise"], row["copy"], load,
                                  sides=("noise", "copy_"))
        budget = 0.7 * row["copy_bytes"] / row["fwd_bytes"]
        row["noise_share_of_fwd_budget"] = None if problem else per_copy * budget
        if problem:
            row["unreliable_ratios"]["noise_share_of_fwd_budget"] = {**problem, "value": problem["value"] * budget}
        noise_ns = row["noise"]["median"] / row["D"] * row["threads"] * 1e9
        share = (f"{row['noise_share_of_fwd_budget']:.0%} of the whole forward's time at 70 % of copy_'s bandwidth"
                 if not problem else "its share of the forward's budget withheld (see the warnings)")
        print(f"  of which the Philox noise alone (one Philox4x32-10 per element and step: the SPEC's, shared by the "
              f"three backends) {noise_ns:.1f} ns per element and thread, {share}.")


def add_ratios(row: dict, eager: dict | None, load: dict) -> None:
    """Fractions of copy_ (op forward, each phase, phases' forward and backward) and speedup vs eager, each
    withheld under `unreliable_ratios` when load or spread make it meaningless."""
    unreliable: dict = {}
    tag = f"{row['impl']} D={row['D']:,}"
    row["copy_gbps"] = row["copy_bytes"] / row["copy"]["median"] / 1e9
    row["fwd_ms"], row["fwd_bwd_ms"] = row["fwd"]["median"] * 1e3, row["fwd_bwd"]["median"] * 1e3
    row["fwd_gbps"] = row["fwd_bytes"] / row["fwd"]["median"] / 1e9
    row["fwd_frac_of_copy"] = fraction_of_copy("fwd_frac_of_copy", f"{tag} fwd/copy", row, row["fwd"],
                                             row["fwd_bytes"], load, unreliable)
    if row["phases"]:
        ph = row["phases"]
        for name, t in ph.items():
            t["ms"], t["gbps"] = t["median"] * 1e3, t["bytes"] / t["median"] / 1e9
            t["frac_of_copy"] = fraction_of_copy(f"{name}_frac_of_copy", f"{tag} {name}/copy", row, t, t["bytes"],
                                                 load, unreliable)
        for side, names, nbytes in (("kernel_fwd", ("mask_sums", "merge_apply"), row["fwd_bytes"]),
                                    ("kernel_bwd", ("backward_accumulate", "backward_logits"), row["bwd_bytes"])):
            # the phases' summed medians, spread that of the worse phase (conservative)
            total = {"median": sum(ph[k]["median"] for k in names), "spread": max(ph[k]["spread"] for k in names),
                     "samples": ph[names[0]]["samples"]}
            row[f"{side}_ms"] = total["median"] * 1e3
            row[f"{side}_frac_of_copy"] = fraction_of_copy(f"{side}_frac_of_copy", f"{tag} {side}/copy", row, total,
                                                          nbytes, load, unreliable)
    if eager is not None and row is not eager:
        row["fwd_bwd_speedup_vs_eager"], problem = ratio(f"{tag} fwd+bwd speedup vs eager", row["fwd_bwd"],
                                                         eager["fwd_bwd"], load, invert=True,
                                                         sides=("fused", "eager"))
        if problem:
            unreliable["fwd_bwd_speedup_vs_eager"] = problem
        row["extra_peak_vs_eager"] = row["extra_peak_mb"] / max(eager["extra_peak_mb"], 1e-9)
    row["unreliable_ratios"] = unreliable


def run_worker(impl: str, size: int, args) -> dict:
    """Times in one fresh process, peak memory in another, so neither measurement disturbs the other."""
    row = {}
    for measure in ("time", "memory"):
        cmd = [sys.executable, __file__, "--worker", "--impl", impl, "--size", str(size), "--tasks", str(args.tasks),
               "--dtype", args.dtype, "--repeats", str(args.repeats), "--threads", str(args.threads),
               "--measure", measure]
        env = dict(os.environ)
        if measure == "memory":
            # A fixed mmap threshold makes glibc return every large block at once, so RssAnon tracks live tensors
            # (it would slow the timed runs with page faults, hence a separate process).
            env["MALLOC_MMAP_THRESHOLD_"] = "65536"
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            raise SystemExit(f"worker {impl} ({measure}) at D={size} failed:\n{done.stderr[-3000:]}")
        row.update(json.loads(done.stdout.strip().splitlines()[-1]))
    return row


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1M,8M,32M,87.5M", help="comma-separated D values (K/M/G suffixes)")
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="task-vector storage dtype")
    parser.add_argument("--impls", default="pyfuse-cpp,eager", help="pyfuse-<backend> and/or eager")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats after a warm-up (>= 5 for ratios)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--impl", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--measure", choices=["time", "memory"], help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    rows = []
    with LoadWatch(args.threads) as load:
        for size in map(parse_size, args.sizes.split(",")):
            rows.append([run_worker(impl, size, args) for impl in args.impls.split(",")])
    for group in rows:
        eager = next((r for r in group if r["impl"] == "eager"), None)
        for row in group:
            add_ratios(row, eager, load.as_dict())
    rows = [row for group in rows for row in group]
    print(f"concrete_merge: n={args.tasks} task vectors ({args.dtype}), CLIP-ViT layout (199 tensors), "
          f"{args.threads} threads, {args.repeats} timed repeats after a warm-up (medians); load average "
          f"{load.before:.2f} before, {load.after:.2f} after")
    print_table(rows, [
        ("impl", "impl", "s"), ("D", "D", ",d"), ("fwd_ms", "fwd ms", ".1f"), ("fwd_bwd_ms", "fwd+bwd ms", ".1f"),
        ("fwd_bwd_speedup_vs_eager", "speedup", ".2f"), ("extra_peak_mb", "extra peak MiB", ".1f"),
        ("extra_peak_vs_eager", "mem vs eager", ".3f"), ("fwd_gbps", "fwd GB/s", ".2f"),
        ("copy_gbps", "copy GB/s", ".2f"), ("fwd_frac_of_copy", "fwd/copy", ".2f"),
        ("kernel_fwd_ms", "kernel fwd ms", ".1f"), ("kernel_fwd_frac_of_copy", "kernel fwd/copy", ".2f"),
        ("kernel_bwd_ms", "kernel bwd ms", ".1f"), ("kernel_bwd_frac_of_copy", "kernel bwd/copy", ".2f"),
    ])
    print("fwd/copy: the op call, output allocation included; kernel: its phases into existing buffers; "
          "bytes: what the op must read and write once.")
    print("Where the time goes (each phase alone; spread = (max - min) / median of its repeats):")
    phase_rows = [{"impl": row["impl"], "D": row["D"], "phase": name, **t, "spread_pct": 100 * t["spread"]}
                  for row in rows for name, t in row["phases"].items()]
    phase_rows += [{"impl": row["impl"], "D": row["D"], "phase": "copy_", "ms": row["copy"]["median"] * 1e3,
                    "gbps": row["copy_gbps"], "spread_pct": 100 * row["copy"]["spread"]} for row in rows]
    print_table(phase_rows, [("impl", "impl", "s"), ("D", "D", ",d"), ("phase", "phase", "s"), ("ms", "ms", ".1f"),
                             ("spread_pct", "spread %", ".0f"), ("gbps", "GB/s", ".2f"),
                             ("frac_of_copy", "/copy", ".2f")])
    for row in rows:
        if row["phases"]:
            mask_share(row, load.as_dict())
    for row in rows:
        warn_unreliable(row["unreliable_ratios"])
    print("Triton on an H100 (ESTIMATE from bytes moved at 3.35 TB/s, not measured):")
    for row in rows:
        if row["impl"] != "eager":
            print(f"  D={row['D']:,}: forward ~{row['h100_fwd_estimate_ms']:.2f} ms, "
                  f"forward+backward ~{row['h100_fwd_bwd_estimate_ms']:.2f} ms")
    write_json(args.json, {"benchmark": "concrete_merge", "provenance": run_provenance(__file__, argv, args.threads),
                           "load": load.as_dict(), "seeds": {"inputs": 0, "mask": 0},
                           "config": {k: getattr(args, k) for k in ("sizes", "tasks", "dtype", "impls", "repeats",
                                                                    "threads")},
                           "rows": rows})


if __name__ == "__main__":
    main()
