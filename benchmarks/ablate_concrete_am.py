"""Ablations of layer-wise Concrete AdaMerging on the embedded real benchmark, over seeds.

Each variant changes one setting of Concrete AdaMerging (or of the AdaMerging baseline) from the demo's
defaults and runs once per seed on the demo's fine-tuned models (the demo's cache; fine-tuned on first use).
For Concrete AdaMerging the meta phase runs once per (variant, seed) and phase 2 (AdaMerging under the
fixed evaluation mask) once per evaluation mask asked for, so the evaluation-mask rows share their mask.

Reported per run: final test accuracy per task and on average, the largest predicted-class share per task
(1.0 = one class for everything), and for the meta phase the accuracy, entropy and coefficient range at
lambda' (the coefficients after the last inner step, where the mask was trained).

    python benchmarks/ablate_concrete_am.py --seeds 0,1,2 --json ablation.json
    python benchmarks/ablate_concrete_am.py --variants authors_fusion_bench,clamp --seeds 0 --test-limit 200
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_json  # noqa: E402

from pyfuse.adaptive.loop import AdaptiveLoop, RunOptions, Settings  # noqa: E402
from pyfuse.demo import DemoSettings, evaluate, prepare_demo  # noqa: E402
from pyfuse.ops import DEFAULT_TEMPERATURE  # noqa: E402
from pyfuse.taskvectors import TaskVectors  # noqa: E402

# name: (method, overrides of the demo's Concrete AM settings, evaluation masks)
VARIANTS: dict[str, tuple[str, dict[str, Any], tuple[str, ...]]] = {
    "adamerging": ("adamerging", {"clamp": False}, ()),
    "adamerging_clamp": ("adamerging", {"clamp": True}, ()),
    "authors_fusion_bench": ("concrete_adamerging", {"clamp": False}, ("relaxed",)),
    "clamp": ("concrete_adamerging", {"clamp": True}, ("relaxed", "hard", "threshold", "expected")),
    "inner_adam_0.1": ("concrete_adamerging", {"clamp": False, "inner_lr": 0.1}, ("relaxed",)),
    "inner_sgd_1": ("concrete_adamerging", {"clamp": False, "inner_optimizer": "sgd", "inner_lr": 1.0}, ("relaxed",)),
    "clamp_inner_adam_0.1": ("concrete_adamerging", {"clamp": True, "inner_lr": 0.1}, ("relaxed",)),
    "clamp_T1": ("concrete_adamerging", {"clamp": True, "temperature": 1.0}, ("relaxed",)),
    "clamp_T0.2": ("concrete_adamerging", {"clamp": True, "temperature": 0.2}, ("relaxed",)),
    "clamp_paper_lrs": ("concrete_adamerging", {"clamp": True, "mask_lr": 1e-3, "lr": 1e-3}, ("relaxed",)),
    "clamp_150_steps": ("concrete_adamerging", {"clamp": True, "steps": 150}, ("relaxed",)),
    "authors_fusion_bench_150_steps": ("concrete_adamerging", {"clamp": False, "steps": 150}, ("relaxed",)),
    # the authors' language (Flan-T5) setting: Adam 1e-4 x 1000 AdaMerging steps, inner Adam 0.1, mask Adam
    # 1e-4 x 2000 meta steps, clamped; as totals over the demo's schedule
    "language_adamerging": ("adamerging", {"clamp": True, "lr_movement": 0.1}, ()),
    "language": ("concrete_adamerging", {"clamp": True, "inner_lr": 0.1, "lr_movement": 0.1, "mask_movement": 0.2},
                 ("relaxed",)),
    "language_T1": ("concrete_adamerging", {"clamp": True, "inner_lr": 0.1, "lr_movement": 0.1, "mask_movement": 0.2,
                                            "temperature": 1.0}, ("relaxed",)),
    "language_T0.2": ("concrete_adamerging", {"clamp": True, "inner_lr": 0.1, "lr_movement": 0.1,
                                              "mask_movement": 0.2, "temperature": 0.2}, ("relaxed",)),
}


def run_variant(ctx, name: str, seed: int, backend: str, eval_masks: set[str] | None) -> list[dict[str, Any]]:
    method, overrides, masks = VARIANTS[name]
    masks = tuple(m for m in masks if eval_masks is None or m in eval_masks) or masks[:1]
    overrides = dict(overrides)
    steps = overrides.pop("steps", ctx.settings.steps)
    lr = overrides.pop("lr", overrides.pop("lr_movement", 1.0) / steps)
    mask_lr = overrides.pop("mask_lr", overrides.pop("mask_movement", 2.0) / steps)
    common = {"coefficients": "layer", "lr": lr, "seed": seed, "inner_lr": ctx.settings.inner_lr, **overrides}
    tasks = ctx.adaptation(seed)
    vectors = ctx.task_vectors()
    options = RunOptions(progress=False, backend=backend, checkpoint_every=0, eval_start=False)
    base = {"variant": name, "method": method, "seed": seed, "steps": steps, "lr": lr, **overrides}
    if method == "adamerging":
        clock = time.perf_counter()
        settings = Settings(method=method, adapt_steps=steps, **{k: v for k, v in common.items() if k != "inner_lr"})
        result = AdaptiveLoop(ctx.encoder.module, vectors, tasks, settings, options).run()
        return [{**base, "eval_mask": None, **_final(ctx, result, tasks), "seconds": time.perf_counter() - clock}]

    clock = time.perf_counter()
    meta = Settings(method=method, meta_steps=steps, inner_steps=1, mask_lr=mask_lr, eval_mask="relaxed", **common)
    meta_result = AdaptiveLoop(ctx.encoder.module, vectors, tasks, meta, options).run()
    lam = meta_result.coefficients
    at_lambda = {"accuracy_at_lambda_prime": meta_result.report["final_average"],
                 "class_share_at_lambda_prime": meta_result.report["final_class_share"],
                 "entropy_last_meta_step": meta_result.report["entropy"]["value"][-1],
                 "lambda_prime_min": float(lam.min()), "lambda_prime_max": float(lam.max())}
    meta_seconds = time.perf_counter() - clock
    rows = []
    for mask in masks:
        clock = time.perf_counter()
        phase_vectors, eval_mask = vectors, mask
        if mask == "expected":  # m = sigmoid(logits), rescaled per tensor: folded into the task vectors
            phase_vectors = _expected_mask_vectors(vectors, meta_result.logits)
            eval_mask = "none"
        settings = Settings(method=method, adapt_steps=steps, eval_mask=eval_mask,
                            temperature=overrides.get("temperature", DEFAULT_TEMPERATURE),
                            **{k: v for k, v in common.items() if k not in ("inner_lr", "inner_optimizer",
                                                                            "temperature")})
        loop = AdaptiveLoop(ctx.encoder.module, phase_vectors, tasks, settings, options)
        with torch.no_grad():
            loop.merger.logits.copy_(meta_result.logits)
        result = loop.run()
        rows.append({**base, "eval_mask": mask, **_final(ctx, result, tasks), **at_lambda,
                     "seconds": meta_seconds + time.perf_counter() - clock})
    return rows


def _expected_mask_vectors(vectors: TaskVectors, logits: torch.Tensor) -> TaskVectors:
    m = torch.sigmoid(logits.float())
    offsets = vectors.layout.offsets.tolist()
    r = torch.empty_like(m)
    for a, b in zip(offsets[:-1], offsets[1:]):
        r[a:b] = m[a:b] / m[a:b].mean()
    return dataclasses.replace(vectors, vectors=(vectors.vectors.float() * r).to(vectors.vectors.dtype))


def _final(ctx, result, tasks) -> dict[str, Any]:
    run = evaluate(lambda *a, **k: torch.func.functional_call(ctx.encoder.module, result.state_dict, a, k), tasks)
    coefficients = result.coefficients
    return {"accuracy": run.accuracy, "average": statistics.fmean(run.accuracy.values()),
            "class_share": run.class_share, "coefficient_min": float(coefficients.min()),
            "coefficient_max": float(coefficients.max())}


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["variant"], row["eval_mask"]), []).append(row)
    out = []
    for (variant, mask), runs in groups.items():
        tasks = list(runs[0]["accuracy"])
        averages = [r["average"] for r in runs]
        out.append({
            "variant": variant, "eval_mask": mask, "seeds": [r["seed"] for r in runs],
            "average": statistics.fmean(averages),
            "average_std": statistics.stdev(averages) if len(runs) > 1 else None,
            "accuracy": {t: statistics.fmean(r["accuracy"][t] for r in runs) for t in tasks},
            "worst_task": min(tasks, key=lambda t: statistics.fmean(r["accuracy"][t] for r in runs)),
            "max_class_share": max(max(r["class_share"].values()) for r in runs),
            "accuracy_at_lambda_prime": (statistics.fmean(r["accuracy_at_lambda_prime"] for r in runs)
                                         if "accuracy_at_lambda_prime" in runs[0] else None),
            "seconds": statistics.fmean(r["seconds"] for r in runs),
        })
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {', '.join(VARIANTS)}")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=DemoSettings().steps, help="schedule length (both phases)")
    parser.add_argument("--test-limit", type=int, default=None, help="first N test examples per task (default all)")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--eval-masks", help="only these of a variant's evaluation masks (default all)")
    parser.add_argument("--json", help="write every run and the summary here")
    args = parser.parse_args()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant {unknown[0]!r}; choose from {', '.join(VARIANTS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    eval_masks = set(args.eval_masks.split(",")) if args.eval_masks else None
    known = {m for _, _, masks in VARIANTS.values() for m in masks}
    if eval_masks is not None and not eval_masks <= known:
        unknown_mask = sorted(eval_masks - known)[0]
        parser.error(f"unknown evaluation mask {unknown_mask!r}; choose from {', '.join(sorted(known))}")
    settings = DemoSettings(steps=args.steps, test_limit=args.test_limit, seeds=tuple(seeds))
    ctx = prepare_demo(settings, progress=False, log=print)
    rows: list[dict[str, Any]] = []
    for variant in variants:
        for seed in seeds:
            for row in run_variant(ctx, variant, seed, args.backend, eval_masks):
                rows.append(row)
                print(f"{variant:32s} seed {seed} eval {str(row['eval_mask']):9s} avg {100 * row['average']:.1f} "
                      + " ".join(f"{100 * v:.1f}" for v in row["accuracy"].values())
                      + f"  share {max(row['class_share'].values()):.2f}  {row['seconds']:.0f} s", flush=True)
                write_json(args.json, {"settings": dataclasses.asdict(settings), "runs": rows,
                                       "summary": summarise(rows)})
    print()
    for s in summarise(rows):
        std = "" if s["average_std"] is None else f" ± {100 * s['average_std']:.1f}"
        print(f"{s['variant']:32s} {str(s['eval_mask']):9s} {100 * s['average']:.1f}{std}  worst {s['worst_task']} "
              f"{100 * s['accuracy'][s['worst_task']]:.1f}  max share {s['max_class_share']:.2f}")


if __name__ == "__main__":
    main()
