"""TIES merging of three Llama checkpoints (~168M parameters each): pyfuse against mergekit, in one run.

Builds a random base Llama (vocab 32000, hidden 1024, intermediate 2816, 8 layers, 16 heads) and two
fine-tuned copies (base + noise), saved with `save_pretrained` in 200MB shards, then merges them with
TIES at density 0.5 three ways, each as a command-line subprocess so all are measured alike:

- `pyfuse merge` with the paper's whole-model trim (trim: global),
- `pyfuse merge` with mergekit's per-tensor trim (trim: tensor),
- `mergekit-yaml` with the equivalent `ties` config, when mergekit is installed.

All use lambda 1 and the normalised (mean) merge, which is what mergekit's `ties` computes; pyfuse's
per-tensor output is checked against mergekit's. Reported per run: wall time (process start to exit,
imports included), pyfuse's own merge time from its report, and peak anonymous memory (RssAnon of the
process, polled every 20 ms; memory-mapped weights are file-backed and not counted).

    python benchmarks/bench_static_merge.py --json bench_static_merge.json
    python benchmarks/bench_static_merge.py --scale 0.25          # a quick run on ~15M-parameter models
"""

from __future__ import annotations

import argparse
import importlib.util
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
from common import print_table, rss_anon_bytes, write_json  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DENSITY = 0.5
PYFUSE_CLI = "import sys; from pyfuse.cli import main; sys.exit(main(sys.argv[1:]))"


def llama_config(scale: float):
    import transformers

    hidden = max(64, round(1024 * scale / 64) * 64)
    return transformers.LlamaConfig(
        vocab_size=max(256, int(32000 * scale)), hidden_size=hidden,
        intermediate_size=max(64, round(2816 * scale / 16) * 16), num_hidden_layers=8,
        num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
    )


def build_checkpoints(root: Path, scale: float) -> tuple[int, int]:
    """base/, ft0/, ft1/ under root; returns (parameters per model, bytes per model on disk)."""
    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(llama_config(scale))
    model.save_pretrained(root / "base", max_shard_size="200MB")
    base = {k: v.clone() for k, v in model.state_dict().items()}
    for i in range(2):
        g = torch.Generator().manual_seed(i + 1)
        with torch.no_grad():
            for key, param in model.named_parameters():
                param.copy_(base[key] + 0.01 * torch.randn(param.shape, generator=g))
        model.save_pretrained(root / f"ft{i}", max_shard_size="200MB")
    size = sum(f.stat().st_size for f in (root / "base").glob("*.safetensors"))
    return sum(v.numel() for v in base.values()), size


def run_measured(command: list[str], env: dict[str, str]) -> dict:
    """Run a command; its wall time and the peak RssAnon seen while polling every 20 ms."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    peak = 0
    while process.poll() is None:
        try:
            peak = max(peak, rss_anon_bytes(process.pid) or 0)  # None once the process has exited
        except (OSError, RuntimeError):  # the process is exiting
            pass
        time.sleep(0.02)
    wall = time.perf_counter() - start
    output = process.stdout.read().decode(errors="replace")
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({process.returncode}):\n{output[-3000:]}")
    return {"wall_s": wall, "peak_rss_anon_mib": peak / 2**20}


def pyfuse_run(root: Path, trim: str, env: dict[str, str], hash_inputs: bool) -> dict:
    config = {"method": "ties", "base": str(root / "base"), "models": [str(root / "ft0"), str(root / "ft1")],
              "parameters": {"density": DENSITY, "scaling": 1.0, "merge_func": "mean", "trim": trim}}
    path = root / f"pyfuse-{trim}.yaml"
    path.write_text(yaml.safe_dump(config))
    out = root / f"out-pyfuse-{trim}"
    command = [sys.executable, "-c", PYFUSE_CLI, "merge", str(path), str(out), "--no-progress", "--force"]
    result = run_measured(command + ([] if hash_inputs else ["--no-hash"]), env)
    report = json.loads((out / "merge_report.json").read_text())
    result["merge_s"] = report["timings"]["total_s"]
    result["hash_s"] = report["timings"].get("hash_s")
    result["predicted_peak_rss_anon_mib"] = report["predicted_peak_rss_anon_bytes"] / 2**20
    return result


def mergekit_run(root: Path, env: dict[str, str]) -> dict:
    config = {"merge_method": "ties", "base_model": str(root / "base"), "dtype": "float32",
              "models": [{"model": str(root / f"ft{i}"), "parameters": {"weight": 1.0, "density": DENSITY}}
                         for i in range(2)],
              "parameters": {"normalize": True, "lambda": 1.0}}
    path = root / "mergekit.yaml"
    path.write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "mergekit.scripts.run_yaml", str(path), str(root / "out-mergekit"),
               "--no-copy-tokenizer", "--quiet"]
    return run_measured(command, env)


def compare(a: Path, b: Path) -> tuple[float, int]:
    """Largest absolute difference between two merged checkpoints, and how many entries differ."""
    from safetensors import safe_open

    def tensors(path: Path):
        files = {}
        for shard in path.glob("*.safetensors"):
            handle = safe_open(str(shard), framework="pt")
            files.update({key: handle for key in handle.keys()})
        return files

    left, right = tensors(a), tensors(b)
    if left.keys() != right.keys():
        raise RuntimeError(f"{a} and {b} hold different tensors: {sorted(left.keys() ^ right.keys())[:5]}")
    largest, count = 0.0, 0
    for key in left:
        difference = (left[key].get_tensor(key) - right[key].get_tensor(key)).abs()
        largest, count = max(largest, float(difference.max())), count + int((difference > 0).sum())
    return largest, count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0, help="width of the models relative to ~168M (1.0)")
    parser.add_argument("--workdir", help="where to build the checkpoints (default: a new temp dir, removed)")
    parser.add_argument("--no-hash", action="store_true", help="run pyfuse without hashing its inputs")
    parser.add_argument("--skip-mergekit", action="store_true", help="do not run mergekit even if installed")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    root = Path(args.workdir or tempfile.mkdtemp(prefix="pyfuse-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    try:
        started = time.perf_counter()
        params, size = build_checkpoints(root, args.scale)
        print(f"built 3 Llama checkpoints of {params / 1e6:.1f}M parameters ({size / 2**20:.0f} MiB each) in "
              f"{time.perf_counter() - started:.0f} s under {root}")
        load = [os.getloadavg()[0]]
        runs = []
        for trim in ("global", "tensor"):
            runs.append({"run": f"pyfuse ties trim={trim}", **pyfuse_run(root, trim, env, not args.no_hash)})
        has_mergekit = importlib.util.find_spec("mergekit") is not None
        if has_mergekit and not args.skip_mergekit:
            runs.append({"run": "mergekit ties", **mergekit_run(root, env)})
            difference, differing = compare(root / "out-pyfuse-tensor", root / "out-mergekit")
            print(f"pyfuse trim=tensor vs mergekit: {differing} of {params} entries differ, by at most "
                  f"{difference:.3g} (pyfuse keeps every tie at a tensor's threshold, mergekit exactly k)")
        else:
            difference = differing = None
            print("mergekit: skipped (" + ("--skip-mergekit" if has_mergekit else
                                           "not installed; pip install --no-deps mergekit and its light deps")
                  + ")")
        load.append(os.getloadavg()[0])
        reference = runs[-1] if runs[-1]["run"].startswith("mergekit") else None
        for run in runs:
            if reference is not None:
                run["speedup_vs_mergekit"] = reference["wall_s"] / run["wall_s"]
                run["memory_vs_mergekit"] = run["peak_rss_anon_mib"] / reference["peak_rss_anon_mib"]
        print_table(runs, [("run", "run", ""), ("wall_s", "wall s", ".1f"), ("merge_s", "merge s", ".1f"),
                           ("hash_s", "of which hash s", ".1f"), ("peak_rss_anon_mib", "peak RssAnon MiB", ".0f"),
                           ("predicted_peak_rss_anon_mib", "predicted MiB", ".0f"),
                           ("speedup_vs_mergekit", "speed-up", ".1f"), ("memory_vs_mergekit", "memory ratio", ".2f")])
        global_over_tensor = runs[0]["wall_s"] / runs[1]["wall_s"]
        print(f"global / per-tensor time: {global_over_tensor:.2f}; load average {load[0]:.1f} -> {load[1]:.1f} "
              f"on {os.cpu_count()} cores")
        write_json(args.json, {
            "models": {"parameters": params, "bytes_each": size, "scale": args.scale, "density": DENSITY},
            "runs": runs, "global_over_tensor_time": global_over_tensor,
            "pyfuse_tensor_vs_mergekit": {"max_abs_diff": difference, "entries_differing": differing},
            "load_average": load,
            "cpus": os.cpu_count(), "torch": torch.__version__,
        })
    finally:
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
