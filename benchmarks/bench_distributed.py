"""The distributed merge (`torchrun --nproc-per-node N -m pyfuse merge`) at world size 1 and 2, in one run.

Builds the 168M-parameter Llama checkpoints of `bench_static_merge.py` (base and two fine-tuned copies) and
merges them with TIES (whole-model trim, density 0.5) as one process and under torchrun with 2 gloo processes,
checks that the merged tensors are bit-identical, and reports per run: wall time (process start to exit,
imports and the rendezvous included; median and spread of `--repeats` runs after `--warmup`) and, per rank
from the merge report, the tensors merged, the bytes of model tensors read (every pass counted: TIES reads
each tensor 4 times) and the peak anonymous memory (RssAnon, polled every 20 ms; memory-mapped weights are
file-backed and not counted). On a 2-core machine no speed-up is expected; what falls with the world size is
the work, bytes read and memory per rank.

    python benchmarks/bench_distributed.py --json bench_distributed.json
    python benchmarks/bench_distributed.py --scale 0.25      # ~10M-parameter models, quick

Then one outer step of layer-wise Concrete AdaMerging (`bench_concrete_step.py`'s fused problem: a CLIP
ViT-B/32 tower, random bf16 task vectors and images) at world size 1 and 2, the tasks and the flat buffer
split over the ranks (each rank builds and holds only its shard of base, task vectors and mask logits): per
rank the step time (median and spread of `--am-steps` after `--am-warmup`), the shard's elements, the task-
vector bytes it holds, and its peak RssAnon over setup and steps (the CLIP tower's own weights, the whole
merged `[D]` and its gradient buffer are held by every rank). The ratios world size 2 over 1 (merge wall time;
step time, of the slower rank) are withheld when load or spread make them meaningless (benchmarks/common.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_concrete_step import add_tower_options  # noqa: E402
from bench_static_merge import REPO, add_repeat_options, build_checkpoints, compare, run_repeated  # noqa: E402
from common import (  # noqa: E402
    LoadWatch,
    print_table,
    ratio,
    run_provenance,
    summary,
    warn_unreliable,
    write_json,
)


def merge_run(root: Path, world: int, env: dict[str, str], repeats: int, warmup: int) -> tuple[dict, list[dict]]:
    config = {"method": "ties", "base": str(root / "base"), "models": [str(root / "ft0"), str(root / "ft1")],
              "parameters": {"density": 0.5, "trim": "global"}}
    path = root / "ties.yaml"
    path.write_text(yaml.safe_dump(config))
    out = root / f"out-{world}"
    launcher = ([sys.executable, "-m", "pyfuse"] if world == 1 else
                [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
                 "-m", "pyfuse"])
    measured = run_repeated([*launcher, "merge", str(path), str(out), "--no-progress", "--force", "--no-hash"], env,
                            repeats, warmup)
    report = json.loads((out / "merge_report.json").read_text())
    ranks = report.get("distributed", {}).get("ranks") or [
        {"rank": 0, "tensors": report["merged_tensors"] + report["carried_tensors"],
         "bytes_read": report["bytes_read"], "seconds": report["timings"]["total_s"],
         "peak_rss_anon_bytes": report["peak_rss_anon_bytes"]}]
    rows = [{"run": f"world size {world}", "rank": r["rank"], "wall": measured["wall"], "wall_s": measured["wall_s"],
             "spread": measured["wall"]["spread"], "tensors": r["tensors"],
             "read_mib": r["bytes_read"] / 2**20, "rank_s": r["seconds"],
             "peak_rss_anon_mib": r["peak_rss_anon_bytes"] / 2**20} for r in ranks]
    return measured, rows


def concrete_step_child(args: argparse.Namespace) -> None:
    """In each rank: `bench_concrete_step`'s fused problem (CLIP ViT-B/32 tower, random task vectors), whose
    loop splits its tasks over the ranks; times `--am-steps` outer steps after `--am-warmup` untimed ones and
    prints this rank's figures."""
    from bench_concrete_step import _fused, _setup, build_parser

    from pyfuse import distributed
    from pyfuse.memory import PeakRssAnon

    torch.set_num_threads(1)
    with distributed.group() as ranks, PeakRssAnon() as memory:
        # bench_concrete_step's own options, its defaults for the rest (bf16 vectors, auto backend, 10 classes)
        problem = build_parser().parse_args([
            "--tasks", str(args.am_tasks), "--batch", str(args.am_batch), "--steps", str(args.am_steps),
            "--hidden", str(args.hidden), "--layers", str(args.layers), "--image-size", str(args.image_size)])
        step, info = _fused(problem, *_setup(problem), ranks=ranks)
        for t in range(args.am_warmup):
            step(t)
        seconds = []
        for t in range(args.am_warmup, args.am_warmup + args.am_steps):
            started = time.perf_counter()
            step(t)
            seconds.append(time.perf_counter() - started)
        rank = ranks.rank if ranks is not None else 0
        print("RESULT " + json.dumps({"rank": rank, "step": summary(seconds), "peak_rss_anon_bytes": memory.peak,
                                      "elements": info["elements"], "numel": info["numel"],
                                      "task_vector_bytes": info["task_vector_bytes"]}))


def concrete_step_run(world: int, args: argparse.Namespace, env: dict[str, str]) -> list[dict]:
    launcher = ([sys.executable] if world == 1 else
                [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}"])
    command = [*launcher, __file__, "--am-child", "--am-tasks", str(args.am_tasks), "--am-batch",
               str(args.am_batch), "--am-steps", str(args.am_steps), "--am-warmup", str(args.am_warmup),
               "--hidden", str(args.hidden), "--layers", str(args.layers), "--image-size", str(args.image_size)]
    run = subprocess.run(command, env=env, capture_output=True, text=True)
    if run.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{run.stderr[-3000:]}")
    found = sorted((json.loads(line.removeprefix("RESULT ")) for line in run.stdout.splitlines()
                    if line.startswith("RESULT ")), key=lambda r: r["rank"])
    return [{"run": f"world size {world}", "rank": r["rank"], "step": r["step"], "step_s": r["step"]["median"],
             "spread": r["step"]["spread"], "elements": r["elements"],
             "elements_share": r["elements"] / r["numel"], "task_vector_mib": r["task_vector_bytes"] / 2**20,
             "peak_rss_anon_mib": r["peak_rss_anon_bytes"] / 2**20} for r in found]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0, help="width of the models relative to ~168M (1.0)")
    parser.add_argument("--workdir", help="where to build the checkpoints (default: a new temp dir, removed)")
    parser.add_argument("--am-tasks", type=int, default=4, help="tasks of the Concrete AdaMerging step")
    parser.add_argument("--am-batch", type=int, default=4, help="images per task and pass")
    parser.add_argument("--am-steps", type=int, default=5,
                        help="outer steps timed after the warm-up (median and spread; >= 5 for ratios)")
    parser.add_argument("--am-warmup", type=int, default=1, help="untimed outer steps first")
    parser.add_argument("--skip-merge", action="store_true", help="only the Concrete AdaMerging step")
    parser.add_argument("--am-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", help="write the results here")
    add_repeat_options(parser)
    add_tower_options(parser)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.am_steps < 1:
        parser.error(f"--repeats and --am-steps must be >= 1, got {args.repeats} and {args.am_steps}")
    if args.am_child:
        concrete_step_child(args)
        return

    root = Path(args.workdir or tempfile.mkdtemp(prefix="pyfuse-bench-dist-"))
    root.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    try:
        threads = 1  # OMP_NUM_THREADS=1 in every process: a rank's figures at world size 2 use 2 cores in all
        with LoadWatch(2) as load:
            merges, params, size = {}, None, None
            if not args.skip_merge:
                params, size = build_checkpoints(root, args.scale)
                print(f"built 3 Llama checkpoints of {params / 1e6:.1f}M parameters ({size / 2**20:.0f} MiB each)")
                merges = {world: merge_run(root, world, env, args.repeats, args.warmup) for world in (1, 2)}
                difference, differing = compare(root / "out-1", root / "out-2")
                if differing:
                    raise RuntimeError(f"world size 2 differs from 1 in {differing} entries (by up to {difference})")
            steps = {world: concrete_step_run(world, args, env) for world in (1, 2)}
        rows = [row for world in merges for row in merges[world][1]]
        ratios, unreliable = {}, {}
        slowest = max(steps[2], key=lambda r: r["step_s"])  # the step ends when its slowest rank does
        pairs = {"step_time_world2_over_world1": (slowest["step"], steps[1][0]["step"])}
        if merges:
            pairs["merge_wall_world2_over_world1"] = (merges[2][0]["wall"], merges[1][0]["wall"])
        for key, (two, one) in pairs.items():
            ratios[key], problem = ratio(key, two, one, load.as_dict(), sides=("world size 2", "world size 1"))
            if problem:
                unreliable[key] = problem
        if rows:
            print_table(rows, [("run", "run", ""), ("rank", "rank", "d"), ("wall_s", "wall s", ".1f"),
                               ("spread", "spread", ".0%"), ("rank_s", "rank s", ".1f"), ("tensors", "tensors", "d"),
                               ("read_mib", "read MiB", ".0f"), ("peak_rss_anon_mib", "peak RssAnon MiB", ".0f")])
            print("merged tensors bit-identical at world size 1 and 2")
        step_rows = [row for world in steps for row in steps[world]]
        print(f"Concrete AdaMerging outer step, CLIP vision tower, {args.am_tasks} tasks x {args.am_batch} images, "
              f"bf16 task vectors (each rank holds its shard); median of {args.am_steps} steps after "
              f"{args.am_warmup} warm-up:")
        print_table(step_rows, [("run", "run", ""), ("rank", "rank", "d"), ("step_s", "step s", ".2f"),
                                ("spread", "spread", ".0%"), ("elements", "shard elements", "d"),
                                ("elements_share", "of D", ".3f"), ("task_vector_mib", "task vectors MiB", ".0f"),
                                ("peak_rss_anon_mib", "peak RssAnon MiB", ".0f")])
        if any(value is not None for value in ratios.values()):
            print(", ".join(f"{key} {value:.2f}" for key, value in ratios.items() if value is not None))
        warn_unreliable(unreliable)
        print(f"load average {load.before:.1f} -> {load.after:.1f} on {os.cpu_count()} cores")
        write_json(args.json, {"benchmark": "distributed", "provenance": run_provenance(__file__, argv, threads),
                               "load": load.as_dict(), "repeats": {"repeats": args.repeats, "warmup": args.warmup},
                               "seeds": {"base": 0, "finetuned": "1 + model", "tower": 0, "task_vectors": 1,
                                         "images": "200 + task", "mask": 0},
                               "models": {"parameters": params, "bytes_each": size, "scale": args.scale},
                               "merge": rows, "concrete_step": step_rows, "ratios": ratios,
                               "unreliable_ratios": unreliable})
    finally:
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
