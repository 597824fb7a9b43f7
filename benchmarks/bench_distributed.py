"""The distributed merge (`torchrun --nproc-per-node N -m pyfuse merge`) at world size 1 and 2, in one run.

Builds the 168M-parameter Llama checkpoints of `bench_static_merge.py` (base and two fine-tuned copies) and
merges them with TIES (whole-model trim, density 0.5) as one process and under torchrun with 2 gloo
processes, checks that the merged tensors are bit-identical, and reports per run: wall time (process start
to exit, imports and the rendezvous included) and, per rank from the merge report, the tensors merged, the
bytes of model tensors read (every pass counted: TIES reads each tensor 4 times) and the peak anonymous
memory (RssAnon, polled every 20 ms; memory-mapped weights are file-backed and not counted). On a 2-core
machine no speed-up is expected; what falls with the world size is the work, bytes read and memory per rank.

    python benchmarks/bench_distributed.py --json bench_distributed.json
    python benchmarks/bench_distributed.py --scale 0.25      # ~10M-parameter models, quick
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_static_merge import REPO, build_checkpoints, compare, run_measured  # noqa: E402
from common import print_table, write_json  # noqa: E402


def merge_run(root: Path, world: int, env: dict[str, str]) -> tuple[dict, list[dict]]:
    config = {"method": "ties", "base": str(root / "base"), "models": [str(root / "ft0"), str(root / "ft1")],
              "parameters": {"density": 0.5, "trim": "global"}}
    path = root / "ties.yaml"
    path.write_text(yaml.safe_dump(config))
    out = root / f"out-{world}"
    launcher = ([sys.executable, "-m", "pyfuse"] if world == 1 else
                [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
                 "-m", "pyfuse"])
    measured = run_measured([*launcher, "merge", str(path), str(out), "--no-progress", "--force", "--no-hash"], env)
    report = json.loads((out / "merge_report.json").read_text())
    ranks = report.get("distributed", {}).get("ranks") or [
        {"rank": 0, "tensors": report["merged_tensors"] + report["carried_tensors"],
         "bytes_read": report["bytes_read"], "seconds": report["timings"]["total_s"],
         "peak_rss_anon_bytes": report["peak_rss_anon_bytes"]}]
    rows = [{"run": f"world size {world}", "rank": r["rank"], "wall_s": measured["wall_s"], "tensors": r["tensors"],
             "read_mib": r["bytes_read"] / 2**20, "rank_s": r["seconds"],
             "peak_rss_anon_mib": r["peak_rss_anon_bytes"] / 2**20} for r in ranks]
    return measured, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0, help="width of the models relative to ~168M (1.0)")
    parser.add_argument("--workdir", help="where to build the checkpoints (default: a new temp dir, removed)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    root = Path(args.workdir or tempfile.mkdtemp(prefix="pyfuse-bench-dist-"))
    root.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    try:
        params, size = build_checkpoints(root, args.scale)
        print(f"built 3 Llama checkpoints of {params / 1e6:.1f}M parameters ({size / 2**20:.0f} MiB each)")
        load = [os.getloadavg()[0]]
        rows = []
        for world in (1, 2):
            rows += merge_run(root, world, env)[1]
        load.append(os.getloadavg()[0])
        difference, differing = compare(root / "out-1", root / "out-2")
        if differing:
            raise RuntimeError(f"world size 2 differs from 1 in {differing} entries (by up to {difference})")
        print_table(rows, [("run", "run", ""), ("rank", "rank", "d"), ("wall_s", "wall s", ".1f"),
                           ("rank_s", "rank s", ".1f"), ("tensors", "tensors", "d"),
                           ("read_mib", "read MiB", ".0f"), ("peak_rss_anon_mib", "peak RssAnon MiB", ".0f")])
        print(f"merged tensors bit-identical at world size 1 and 2; load average {load[0]:.1f} -> {load[1]:.1f} "
              f"on {os.cpu_count()} cores")
        write_json(args.json, {"models": {"parameters": params, "bytes_each": size, "scale": args.scale},
                               "rows": rows, "bit_identical": True, "load_average": load,
                               "cpus": os.cpu_count(), "torch": torch.__version__})
    finally:
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
