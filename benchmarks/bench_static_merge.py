"""TIES merging of three Llama checkpoints (~168M parameters each): pyfuse against mergekit, in one run.

Builds a random base Llama (vocab 32000, hidden 1024, intermediate 2816, 8 layers, 16 heads) and two
fine-tuned copies (base + noise), saved with `save_pretrained` in 200MB shards, then merges them with
TIES at density 0.5 three ways, each as a command-line subprocess so all are measured alike:

- `pyfuse merge` with the paper's whole-model trim (trim: global),
- `pyfuse merge` with mergekit's per-tensor trim (trim: tensor),
- `mergekit-yaml` with the equivalent `ties` config, when mergekit is installed.

All use lambda 1 and the normalised (mean) merge, which is what mergekit's `ties` computes; pyfuse's
per-tensor output is checked against mergekit's. Then pyfuse's sparsify-and-consensus methods on the same
checkpoints (`SPARSE_METHODS`: breadcrumbs and DELLA at density 0.5, both variants, and MagMax), timed the
same way (`--skip-sparse` leaves them out). Each command runs `--warmup` untimed times, then `--repeats`
timed ones; reported: the median wall time (process start to exit, imports included) and its spread, pyfuse's
own merge time from its report (median), and the largest peak anonymous memory (RssAnon of the process,
polled every 20 ms; memory-mapped weights are file-backed and not counted). The time ratios (global over
per-tensor trim, speed-up over mergekit) are withheld when load or spread make them meaningless
(benchmarks/common.py); the memory ratio is always given.

    python benchmarks/bench_static_merge.py --json bench_static_merge.json
    python benchmarks/bench_static_merge.py --scale 0.25          # a quick run on ~15M-parameter models

Then every other static method (`--methods`) is timed the same way with its defaults on the same two
fine-tuned models (WUDI with `--wudi-iters` Adam steps per matrix instead of its 400).
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
from collections.abc import Callable
from pathlib import Path

import torch
import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    LoadWatch,
    print_table,
    ratio,
    rss_anon_bytes,
    run_provenance,
    summary,
    warn_unreliable,
    write_json,
)

REPO = Path(__file__).resolve().parent.parent
DENSITY = 0.5
SPARSE_METHODS = {  # run label: (method, parameters); mergekit's default density, 1, would keep everything
    "breadcrumbs": ("breadcrumbs", {"density": DENSITY, "gamma": 0.01}),
    "breadcrumbs_ties": ("breadcrumbs", {"density": DENSITY, "gamma": 0.01, "consensus": True}),
    "della": ("della", {"density": DENSITY, "epsilon": 0.1}),
    "della_linear": ("della", {"density": DENSITY, "epsilon": 0.1, "consensus": False}),
    "magmax": ("magmax", {}),
}
PYFUSE_CLI = "import sys; from pyfuse.cli import main; sys.exit(main(sys.argv[1:]))"
# timed after TIES, with their defaults (TSV, Iso and WUDI work on the matrices, the rest per tensor)
OTHER_METHODS = ("slerp", "nuslerp", "model_stock", "tsv", "iso_c", "iso_cts", "wudi")


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
            peak = max(peak, rss_anon_bytes(process.pid) or 0)  # None while the process starts or exits
        except (OSError, RuntimeError):  # the process is exiting
            pass
        time.sleep(0.02)
    wall = time.perf_counter() - start
    output = process.stdout.read().decode(errors="replace")
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({process.returncode}):\n{output[-3000:]}")
    return {"wall_s": wall, "peak_rss_anon_mib": peak / 2**20}


def run_repeated(command: list[str], env: dict[str, str], repeats: int, warmup: int,
                 after: Callable[[], dict] = dict) -> dict:
    """`run_measured` `warmup` untimed times, then `repeats` timed ones: the wall seconds' `summary` (`wall`, its
    median `wall_s`), the largest peak RssAnon, and `after()`'s figures of each timed run as lists (by key)."""
    for _ in range(warmup):
        run_measured(command, env)
    runs = []
    for _ in range(repeats):
        runs.append({**run_measured(command, env), **after()})
    wall = summary([r["wall_s"] for r in runs])
    extra = {key: [r[key] for r in runs] for key in runs[0] if key not in ("wall_s", "peak_rss_anon_mib")}
    return {"wall": wall, "wall_s": wall["median"], "peak_rss_anon_mib": max(r["peak_rss_anon_mib"] for r in runs),
            **extra}


def pyfuse_run(root: Path, tag: str, method: str, parameters: dict, env: dict[str, str], hash_inputs: bool,
               repeats: int = 1, warmup: int = 0) -> dict:
    config = {"method": method, "base": str(root / "base"), "models": [str(root / "ft0"), str(root / "ft1")],
              "parameters": parameters}
    path = root / f"pyfuse-{tag}.yaml"
    path.write_text(yaml.safe_dump(config))
    out = root / f"out-pyfuse-{tag}"
    command = [sys.executable, "-c", PYFUSE_CLI, "merge", str(path), str(out), "--no-progress", "--force"]

    def from_report() -> dict:
        report = json.loads((out / "merge_report.json").read_text())
        return {"merge_s": report["timings"]["total_s"], "hash_s": report["timings"].get("hash_s"),
                "predicted_peak_rss_anon_mib": report["predicted_peak_rss_anon_bytes"] / 2**20}

    result = run_repeated(command + ([] if hash_inputs else ["--no-hash"]), env, repeats, warmup, from_report)
    result["merge"] = summary(result.pop("merge_s"))
    result["merge_s"] = result["merge"]["median"]
    result["hash_s"] = result["hash_s"][-1]
    result["predicted_peak_rss_anon_mib"] = result["predicted_peak_rss_anon_mib"][-1]
    return result


def mergekit_run(root: Path, env: dict[str, str], repeats: int = 1, warmup: int = 0) -> dict:
    config = {"merge_method": "ties", "base_model": str(root / "base"), "dtype": "float32",
              "models": [{"model": str(root / f"ft{i}"), "parameters": {"weight": 1.0, "density": DENSITY}}
                         for i in range(2)],
              "parameters": {"normalize": True, "lambda": 1.0}}
    path = root / "mergekit.yaml"
    path.write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "mergekit.scripts.run_yaml", str(path), str(root / "out-mergekit"),
               "--no-copy-tokenizer", "--quiet"]
    return run_repeated(command, env, repeats, warmup)


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


def add_repeat_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed runs of each command after the warm-up (median and spread; >= 5 for ratios)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs of each command first")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0, help="width of the models relative to ~168M (1.0)")
    parser.add_argument("--workdir", help="where to build the checkpoints (default: a new temp dir, removed)")
    parser.add_argument("--no-hash", action="store_true", help="run pyfuse without hashing its inputs")
    parser.add_argument("--skip-mergekit", action="store_true", help="do not run mergekit even if installed")
    parser.add_argument("--skip-sparse", action="store_true", help="do not time breadcrumbs, DELLA and MagMax")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--methods", default=",".join(OTHER_METHODS),
                        help=f"other methods to time with their defaults, comma-separated ('' for none; default "
                             f"{','.join(OTHER_METHODS)})")
    parser.add_argument("--wudi-iters", type=int, default=5,
                        help="WUDI's Adam steps per matrix here (its default, 400, takes hours on a CPU)")
    add_repeat_options(parser)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0:
        parser.error(f"--repeats must be >= 1 and --warmup >= 0, got {args.repeats} and {args.warmup}")
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(OTHER_METHODS))
    if unknown:
        parser.error(f"--methods: unknown {unknown[0]!r}; choose among {', '.join(OTHER_METHODS)}")

    root = Path(args.workdir or tempfile.mkdtemp(prefix="pyfuse-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    try:
        started = time.perf_counter()
        params, size = build_checkpoints(root, args.scale)
        print(f"built 3 Llama checkpoints of {params / 1e6:.1f}M parameters ({size / 2**20:.0f} MiB each) in "
              f"{time.perf_counter() - started:.0f} s under {root}")
        repeat = {"repeats": args.repeats, "warmup": args.warmup}
        threads = torch.get_num_threads()  # each merge process's
        with LoadWatch(threads) as load:
            runs = []
            for trim in ("global", "tensor"):
                parameters = {"density": DENSITY, "scaling": 1.0, "merge_func": "mean", "trim": trim}
                runs.append({"run": f"pyfuse ties trim={trim}",
                             **pyfuse_run(root, trim, "ties", parameters, env, not args.no_hash, **repeat)})
            has_mergekit = importlib.util.find_spec("mergekit") is not None
            if has_mergekit and not args.skip_mergekit:
                runs.append({"run": "mergekit ties", **mergekit_run(root, env, **repeat)})
                difference, differing = compare(root / "out-pyfuse-tensor", root / "out-mergekit")
                print(f"pyfuse trim=tensor vs mergekit: {differing} of {params} entries differ, by at most "
                      f"{difference:.3g} (pyfuse keeps every tie at a tensor's threshold, mergekit exactly k)")
            else:
                difference = differing = None
                print("mergekit: skipped (" + ("--skip-mergekit" if has_mergekit else
                                               "not installed; pip install --no-deps mergekit and its light deps")
                      + ")")
            sparse = [] if args.skip_sparse else [
                {"run": f"pyfuse {tag}", **pyfuse_run(root, tag, method, parameters, env, not args.no_hash, **repeat)}
                for tag, (method, parameters) in SPARSE_METHODS.items()]
            others = []
            for method in methods:
                chosen = {"iter_num": args.wudi_iters} if method == "wudi" else {}  # (params: the models' size)
                label = f"pyfuse {method}" + (f" iter_num={args.wudi_iters}" if method == "wudi" else "")
                others.append({"run": label, **pyfuse_run(root, method, method, chosen, env, not args.no_hash,
                                                          **repeat)})
                shutil.rmtree(root / f"out-pyfuse-{method}", ignore_errors=True)
        reference = runs[-1] if runs[-1]["run"].startswith("mergekit") else None
        ratios, unreliable = {}, {}
        for key, (numerator, denominator, sides) in {
                "global_over_tensor_time": (runs[0], runs[1], ("global", "tensor")),
                **({f"{run['run']} speedup_vs_mergekit": (run, reference, ("pyfuse", "mergekit"))
                    for run in runs[:2]} if reference else {})}.items():
            ratios[key], problem = ratio(key, numerator["wall"], denominator["wall"], load.as_dict(),
                                         invert="speedup" in key, sides=sides)
            if problem:
                unreliable[key] = problem
        for run in runs:
            run["spread"] = run["wall"]["spread"]
            if reference is not None:
                run["speedup_vs_mergekit"] = ratios.get(f"{run['run']} speedup_vs_mergekit")
                run["memory_vs_mergekit"] = run["peak_rss_anon_mib"] / reference["peak_rss_anon_mib"]
        columns = [("run", "run", ""), ("wall_s", "wall s", ".1f"), ("spread", "spread", ".0%"),
                   ("merge_s", "merge s", ".1f"), ("hash_s", "of which hash s", ".1f"),
                   ("peak_rss_anon_mib", "peak RssAnon MiB", ".0f"),
                   ("predicted_peak_rss_anon_mib", "predicted MiB", ".0f")]
        print(f"medians of {args.repeats} timed runs after {args.warmup} warm-up; spread = (max - min) / median")
        print_table(runs, columns + [("speedup_vs_mergekit", "speed-up", ".1f"),
                                     ("memory_vs_mergekit", "memory ratio", ".2f")])
        if sparse:
            print(f"sparsify-and-consensus methods, density {DENSITY} (MagMax: none), the same checkpoints:")
            print_table([{**r, "spread": r["wall"]["spread"]} for r in sparse], columns)
        if others:
            print("other methods (defaults), two fine-tuned models, each a `pyfuse merge` process:")
            print_table([{**r, "spread": r["wall"]["spread"]} for r in others], columns)
        if ratios["global_over_tensor_time"] is not None:
            print(f"global / per-tensor time: {ratios['global_over_tensor_time']:.2f}")
        warn_unreliable(unreliable)
        print(f"load average {load.before:.1f} -> {load.after:.1f} on {os.cpu_count()} cores")
        write_json(args.json, {
            "benchmark": "static_merge", "provenance": run_provenance(__file__, argv, threads), "load": load.as_dict(),
            "seeds": {"base": 0, "finetuned": "1 + model"}, "repeats": repeat,
            "models": {"parameters": params, "bytes_each": size, "scale": args.scale, "density": DENSITY},
            "runs": runs, "other_methods": others, "sparse_runs": sparse, "ratios": ratios,
            "unreliable_ratios": unreliable,
            "pyfuse_tensor_vs_mergekit": {"max_abs_diff": difference, "entries_differing": differing},
        })
    finally:
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
