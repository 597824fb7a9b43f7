"""The GPU check: the fused kernels where they are meant to run, in one call (`make gpu-check`).

On a CUDA machine, in under 8 minutes, it
1. op_tests: runs the fused op with the native Triton backend against the float64 oracle of the test suite
   (`tests/oracle.py`): dense and factored LoRA task vectors, fp32 and bf16 storage, forward and fused backward
   (both gradients), every mask mode, small problems shaped like the tests' and one of ~140k elements over
   many kernel blocks; tolerances are the tests' (output 2e-5, gradients 1e-4);
2. op_timing: times the fused forward and forward+backward at D = 87.5M (CLIP ViT-B/32's layout), n = 8 fp32
   task vectors, against the authors' eager per-tensor formula and against a plain device copy moving the
   forward's bytes (base, logits and task vectors read once, the output written once): achieved GB/s and the
   fraction of the copy's; targets: forward >= 70 % of the copy, forward+backward >= 10x the eager formula;
3. loop: runs a 10-step layer-wise Concrete AdaMerging (5 meta steps, inner SGD, then 5 AdaMerging steps) of
   4 tasks on a random CLIP ViT-B/32 vision tower on the GPU (Triton) and the same run on the CPU (C++), TF32
   off, and compares the merged weights: they must agree to atol 1e-4 + rtol 1e-3 (torch.allclose; the task
   vectors are of size ~0.01, so this is 1 % of a task vector's entry);
and writes one JSON of all of it with its provenance (command, commit, date, device, versions). It exits 1
when a correctness check fails (op tests, the loop's agreement, or a section that raised); the timing
targets are reported, not enforced.

Without CUDA, or with --dry-run, it runs the same code end to end at tiny sizes on the CPU (the Triton
kernels under TRITON_INTERPRET=1 for op_tests, the C++ backend for the timing, the reference backend against
the C++ one for the loop), to check its own plumbing
(`tests/test_gpu_check.py`); its figures then say nothing about a GPU.

The GPU machine has no network and its own PyTorch and Triton (of another version than the project's pin):
`make gpu-check` installs the project there with `pip install --no-deps --no-build-isolation -e .` (the C++
extension builds against that torch) and first installs any wheel found in `wheels/`, which is how to carry a
missing dependency: on a machine with network, for the GPU machine's Python and platform,

    pip download nvtx --no-deps --only-binary=:all: --python-version 3.11 \\
        --platform manylinux2014_x86_64 -d wheels/

(the same for safetensors, pyyaml, tqdm or transformers if the GPU machine lacks them; the script says which
imports are missing before any work). Then, on the GPU machine:

    make gpu-check GPU_CHECK_ARGS="--json $OUT/gpu_check.json --commit $(git rev-parse HEAD)"

(`--commit` records the commit when the copy on that machine has no .git). `--sections` runs a subset, e.g.
under Nsight Compute (docs/profiling.md).
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.metadata
import importlib.util
import os
import platform
import shlex
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = ("op_tests", "op_timing", "loop")
REQUIRED = ("numpy", "safetensors", "yaml", "tqdm", "triton", "transformers")
TIME_BUDGET_S = 8 * 60
FWD_COPY_TARGET = 0.70
FWD_BWD_SPEEDUP_TARGET = 10.0
LOOP_ATOL, LOOP_RTOL = 1e-4, 1e-3
# tolerances of tests/test_concrete_merge.py against the float64 oracle
OUT_TOL, GRAD_W_TOL, GRAD_X_RTOL, GRAD_X_ATOL = 2e-5, 1e-4, 1e-4, 1e-5
# CLIP ViT-B/32's vision tower (Hugging Face CLIPVisionConfig), and a tiny one for the dry run
VIT_B32 = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
               image_size=224, patch_size=32)
VIT_TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                patch_size=8)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default="gpu_check.json", help="where the results go (default gpu_check.json)")
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny sizes on the CPU (automatic without CUDA): checks this script's plumbing")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, from {', '.join(SECTIONS)}")
    parser.add_argument("--commit", help="the commit to record (default: git rev-parse HEAD, when there is a .git)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions (median; default 5)")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.sections = tuple(s.strip() for s in args.sections.split(",") if s.strip())
    unknown = [s for s in args.sections if s not in SECTIONS]
    if unknown or not args.sections:
        parser.error(f"unknown section {unknown[0] if unknown else ''!r}; choose from {', '.join(SECTIONS)}")
    return args


def missing_imports() -> list[str]:
    return [name for name in REQUIRED if importlib.util.find_spec(name) is None]


def provenance(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    import pyfuse

    def version(module: str) -> str | None:
        try:  # the module's own version first: CUDA machines often carry triton as "pytorch-triton"
            return str(importlib.import_module(module).__version__)
        except (ImportError, AttributeError):
            pass
        try:
            return importlib.metadata.version(module)
        except importlib.metadata.PackageNotFoundError:
            return None

    commit = args.commit
    if commit is None:
        found = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        commit = found.stdout.strip() if found.returncode == 0 else None
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)")
    return {
        "command": shlex.join([sys.executable, str(Path(__file__).relative_to(ROOT)), *args.argv]),
        "commit": commit,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": name,
        "dry_run": args.dry_run,
        "torch": torch.__version__, "cuda": torch.version.cuda, "triton": version("triton"),
        "nvtx": version("nvtx"), "python": platform.python_version(), "pyfuse": pyfuse.__version__,
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
    }


def synchronizer(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


# ---------------------------------------------------------------------------------------------
# 1. The op against the float64 oracle, with the native Triton backend
# ---------------------------------------------------------------------------------------------
def op_tests(device: torch.device, dry: bool) -> dict[str, Any]:
    import numpy as np

    from pyfuse.ops import concrete_merge
    from tests import oracle
    from tests.test_concrete_merge import make_problem, near_boundary
    from tests.test_lora_concrete_merge import SMALL, make_factored

    seed, step, temperature = 2**40 + 7, 3, 0.5
    modes = ("relaxed", "hard") if dry else ("relaxed", "hard", "threshold", "none")
    medium = [1, 37, 1, 64, 65, 130, 1, 255, 3, 4097, 70001, 65536]
    cases = []

    def check(kind: str, dtype: torch.dtype, mode: str, rescale: bool, size: int, base, tv, logits, weights, offsets,
              dense64) -> None:
        g = torch.randn(base.numel(), generator=torch.Generator().manual_seed(1))
        moved = [t.to(device) for t in (base, logits, weights, offsets, g)]
        x = moved[1].clone().requires_grad_()
        w = moved[2].clone().requires_grad_()
        out = concrete_merge(moved[0], tv.to(device), x, w, moved[3], seed=seed, step=step, temperature=temperature,
                             mask=mode, rescale=rescale, backend="triton")
        out.backward(moved[4])
        ref_out, ref_gw, ref_gx = oracle.merge_and_grads(
            base.double().numpy(), dense64, logits.double().numpy(), weights.double().numpy(), offsets.tolist(),
            g.double().numpy(), seed=seed, step=step, temperature=temperature, mode=mode, rescale=rescale)
        if weights.dim() == 1:
            ref_gw = ref_gw.sum(1)
        errors = []
        for what, found, ref, rtol, atol in (("output", out, ref_out, OUT_TOL, OUT_TOL),
                                             ("grad weights", w.grad, ref_gw, GRAD_W_TOL, GRAD_W_TOL),
                                             ("grad logits", x.grad, ref_gx, GRAD_X_RTOL, GRAD_X_ATOL)):
            try:
                np.testing.assert_allclose(found.detach().double().cpu().numpy(), ref, rtol=rtol, atol=atol)
            except AssertionError as err:
                errors.append(f"{what}: {str(err).strip().splitlines()[2] if len(str(err).splitlines()) > 2 else err}")
        cases.append({"vectors": kind, "dtype": str(dtype).removeprefix("torch."), "mask": mode, "rescale": rescale,
                      "D": int(base.numel()), "size": size, "passed": not errors, "errors": errors})

    for dtype in (torch.float32, torch.bfloat16):
        for mode in modes:
            for rescale in (True, False):
                for layerwise in (True, False):
                    base, tv, logits, weights, offsets = make_problem(tv_dtype=dtype, layerwise=layerwise)
                    if mode == "hard":
                        assert not near_boundary((base, tv, logits, weights, offsets), seed, step, temperature).any()
                    check("dense", dtype, mode, rescale, "small", base, tv, logits, weights, offsets,
                          tv.double().numpy())
                base, factors, logits, weights, offsets = make_factored(**SMALL, dtype=dtype)
                check("lora", dtype, mode, rescale, "small", base, factors, logits, weights, offsets,
                      factors.to(dtype=torch.float64).densify(torch.float64).numpy())
        if not dry:  # many blocks per segment and per launch; relaxed only (a hard mask's coin flips at this size)
            base, tv, logits, weights, offsets = make_problem(medium, n=4, tv_dtype=dtype, seed=5)
            check("dense", dtype, "relaxed", True, "medium", base, tv, logits, weights, offsets, tv.double().numpy())
    failed = [case for case in cases if not case["passed"]]
    return {"cases": cases, "count": len(cases), "failed": len(failed), "passed": not failed,
            "tolerances": {"output": OUT_TOL, "grad_weights": GRAD_W_TOL,
                           "grad_logits": {"rtol": GRAD_X_RTOL, "atol": GRAD_X_ATOL}}}


# ---------------------------------------------------------------------------------------------
# 2. Fused forward and forward+backward against the eager formula and a device copy
# ---------------------------------------------------------------------------------------------
def op_timing(device: torch.device, dry: bool, repeats: int) -> dict[str, Any]:
    from bench_concrete_merge import eager_run, fused_impl, make_inputs
    from common import repeat_time

    numel, n = (20_000, 2) if dry else (87_500_000, 8)
    backend = "auto"  # Triton on CUDA; on the CPU the C++ backend (the Triton interpreter is no timing)
    shapes, offsets, *tensors = make_inputs(numel, n, torch.float32)
    base, tv, logits, weights, grad = (t.to(device) for t in tensors)
    offsets = offsets.to(device)
    D = base.numel()
    sync = synchronizer(device)

    def timed(fn: Callable[[], object]) -> float:
        return repeat_time(lambda: (fn(), sync()), repeats, warmup=2)["median"]

    def reset() -> None:
        logits.grad = weights.grad = None

    rows = {}
    for name, impl in (("fused", fused_impl(backend)), ("eager", eager_run)):
        inputs = (shapes, offsets, base, tv, logits, weights, grad)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        with torch.no_grad():
            fwd_s = timed(lambda impl=impl, inputs=inputs: impl(*inputs, backward=False))
        fwd_bwd_s = timed(lambda impl=impl, inputs=inputs: (reset(), impl(*inputs, backward=True)))
        rows[name] = {"fwd_ms": fwd_s * 1e3, "fwd_bwd_ms": fwd_bwd_s * 1e3,
                      "peak_device_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None}
        reset()
    from pyfuse.ops.backends import resolve

    fwd_bytes = D * 4 * 3 + tv.nbytes  # read base, logits, task vectors once; write the output once
    half = fwd_bytes // 2 // 4  # a copy of this many fp32 reads and writes the same bytes in all
    src, dst = torch.randn(half, device=device), torch.empty(half, device=device)
    copy_s = timed(lambda: dst.copy_(src))
    copy_gbps = 2 * half * 4 / copy_s / 1e9
    fwd_gbps = fwd_bytes / (rows["fused"]["fwd_ms"] / 1e3) / 1e9
    speedup = rows["eager"]["fwd_bwd_ms"] / rows["fused"]["fwd_bwd_ms"]
    return {
        "D": D, "n": n, "tensors": len(shapes), "vector_dtype": "float32", "backend": resolve(backend, device),
        "repeats": repeats, **{f"{impl}_{key}": value for impl, row in rows.items() for key, value in row.items()},
        "fwd_bytes": fwd_bytes, "copy_bytes": 2 * half * 4, "copy_ms": copy_s * 1e3, "copy_gbps": copy_gbps,
        "fused_fwd_gbps": fwd_gbps, "fused_fwd_frac_of_copy": fwd_gbps / copy_gbps,
        "fwd_speedup_vs_eager": rows["eager"]["fwd_ms"] / rows["fused"]["fwd_ms"],
        "fwd_bwd_speedup_vs_eager": speedup,
        "targets": {"fwd_frac_of_copy": FWD_COPY_TARGET, "fwd_bwd_speedup": FWD_BWD_SPEEDUP_TARGET,
                    "fwd_frac_met": fwd_gbps / copy_gbps >= FWD_COPY_TARGET,
                    "fwd_bwd_speedup_met": speedup >= FWD_BWD_SPEEDUP_TARGET},
    }


# ---------------------------------------------------------------------------------------------
# 3. The bi-level loop on the GPU against the same run on the CPU
# ---------------------------------------------------------------------------------------------
def vit_problem(config: dict[str, int], tasks: int, batches: int, batch_size: int, seed: int = 0):
    """A random CLIP vision tower's state dict, one perturbed copy per task (task vectors of size ~0.01), a
    random class head and random images per task."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    base = CLIPVisionModel(CLIPVisionConfig(**config)).state_dict()
    generator = torch.Generator().manual_seed(seed + 1)
    finetuned = [{key: value + 0.01 * torch.randn(value.shape, generator=generator) if value.is_floating_point()
                  else value for key, value in base.items()} for _ in range(tasks)]
    heads = [torch.randn(10, config["hidden_size"], generator=generator) / config["hidden_size"] ** 0.5
             for _ in range(tasks)]
    size = config["image_size"]
    images = [[torch.randn(batch_size, 3, size, size, generator=generator) for _ in range(batches)]
              for _ in range(tasks)]
    return base, finetuned, heads, images


def run_loop(config: dict[str, int], problem, device: torch.device, backend: str):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    import pyfuse

    base, finetuned, heads, images = problem
    names = [f"task{i}" for i in range(len(finetuned))]

    def logits_of(head: torch.Tensor):
        return lambda call, pixels: call(pixel_values=pixels).pooler_output @ head.T

    tasks = [pyfuse.Task(name, batches, logits_of(head.to(device)))
             for name, batches, head in zip(names, images, heads)]
    vectors = pyfuse.TaskVectors.from_models(base, finetuned, names=names, device=device)
    options = pyfuse.RunOptions(device=device, backend=backend, progress=False, eval_start=False, checkpoint_every=0)
    model = CLIPVisionModel(CLIPVisionConfig(**config))
    started = time.perf_counter()
    result = pyfuse.concrete_adamerging(model, vectors, tasks, granularity="layer", meta_steps=5, adamerging_steps=5,
                                        inner_steps=1, inner_optimizer="sgd", inner_lr=0.01, clamp=True, seed=0,
                                        options=options)
    synchronizer(device)()
    return result, time.perf_counter() - started


def loop_check(device: torch.device, dry: bool) -> dict[str, Any]:
    config = VIT_TINY if dry else VIT_B32
    problem = vit_problem(config, tasks=3 if dry else 4, batches=2, batch_size=2)
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # fp32 on both sides
    try:
        # the dry run's "device" run is the reference backend on the CPU (op_tests runs the interpreted Triton
        # kernels; interpreted, a whole run takes minutes), the other one the C++ backend
        on_device, device_s = run_loop(config, problem, device, "reference" if dry else "auto")
        on_cpu, cpu_s = run_loop(config, problem, torch.device("cpu"), "auto")
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    flat, reference = on_device.flat.detach().cpu(), on_cpu.flat.detach()
    diff = (flat - reference).abs()
    agree = bool(torch.allclose(flat, reference, atol=LOOP_ATOL, rtol=LOOP_RTOL))
    return {
        "model": "CLIP ViT-B/32 vision tower, random" if not dry else "tiny CLIP vision tower, random",
        "config": config, "D": int(flat.numel()), "tasks": len(problem[1]), "steps": on_cpu.report["steps"],
        "schedule": "5 meta steps (1 inner SGD step each), then 5 AdaMerging steps; layer-wise coefficients",
        "device_backend": on_device.report["backend"], "cpu_backend": on_cpu.report["backend"],
        "device_report_device": on_device.report["device"],
        "device_seconds": device_s, "cpu_seconds": cpu_s,
        "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
        "coefficients_max_abs_diff": float((on_device.coefficients.cpu() - on_cpu.coefficients).abs().max()),
        "entropy_device": on_device.report["entropy"]["value"], "entropy_cpu": on_cpu.report["entropy"]["value"],
        "tolerance": {"atol": LOOP_ATOL, "rtol": LOOP_RTOL, "rule": "torch.allclose(device, cpu)", "tf32": False},
        "agree": agree,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    args.dry_run = args.dry_run or not cuda
    if not cuda:  # the Triton kernels on the CPU: set before anything imports triton
        os.environ.setdefault("TRITON_INTERPRET", "1")
    missing = missing_imports()
    if missing:
        print(f"gpu_check: missing imports {', '.join(missing)}: put their wheels in wheels/ (see this script's "
              "docstring) and run `make gpu-check` again", file=sys.stderr)
        return 2
    sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]  # tests' oracle and problems; the benchmarks' helpers
    device = torch.device("cuda") if cuda and not args.dry_run else torch.device("cpu")
    results: dict[str, Any] = {"provenance": provenance(args, device), "seconds": {}}
    print(f"gpu_check on {results['provenance']['device']}" + (" (dry run: tiny sizes)" if args.dry_run else ""),
          flush=True)
    started = time.perf_counter()
    run = {"op_tests": lambda: op_tests(device, args.dry_run),
           "op_timing": lambda: op_timing(device, args.dry_run, args.repeats),
           "loop": lambda: loop_check(device, args.dry_run)}
    ok = True
    for section in args.sections:
        tick = time.perf_counter()
        try:
            results[section] = run[section]()
        except Exception as err:  # one failing section must not lose the others' figures
            results[section] = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
            ok = False
        results["seconds"][section] = time.perf_counter() - tick
        print(f"  {section}: {summary(section, results[section])} ({results['seconds'][section]:.1f} s)", flush=True)
    results["seconds"]["total"] = time.perf_counter() - started
    results["within_time_budget"] = results["seconds"]["total"] < TIME_BUDGET_S
    ok = ok and results.get("op_tests", {}).get("passed", True) and results.get("loop", {}).get("agree", True)
    results["passed"] = ok
    from common import write_json

    write_json(args.json, results)
    print(f"gpu_check: {'passed' if ok else 'FAILED'} in {results['seconds']['total']:.1f} s -> {args.json}")
    return 0 if ok else 1


def summary(section: str, result: dict[str, Any]) -> str:
    if "error" in result:
        return f"ERROR {result['error']}"
    if section == "op_tests":
        return f"{result['count'] - result['failed']}/{result['count']} cases match the float64 oracle"
    if section == "op_timing":
        return (f"D={result['D']:,} n={result['n']}: fused fwd {result['fused_fwd_ms']:.2f} ms "
                f"({result['fused_fwd_frac_of_copy']:.2f} of copy), fwd+bwd {result['fused_fwd_bwd_ms']:.2f} ms "
                f"({result['fwd_bwd_speedup_vs_eager']:.1f}x eager)")
    return (f"D={result['D']:,}: max |device - cpu| {result['max_abs_diff']:.2e} "
            f"({'within' if result['agree'] else 'OUTSIDE'} atol {LOOP_ATOL}, rtol {LOOP_RTOL})")


if __name__ == "__main__":
    sys.exit(main())
