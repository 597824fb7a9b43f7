"""Ablations of layer-wise Concrete AdaMerging on the embedded real benchmark, over seeds.

Each variant changes one or two settings of Concrete AdaMerging (or of the AdaMerging baseline) from the
authors' CLIP setting (`AUTHORS_CLIP`) or their language setting (`LANGUAGE`), and names every setting it runs
with, so its label holds whatever the demo's defaults become. Each runs once per seed on the demo's fine-tuned
models (the demo's cache; fine-tuned on first use).
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
from common import provenance, write_json  # noqa: E402

from pyfuse.adaptive.loop import AdaptiveLoop, RunOptions, Settings  # noqa: E402
from pyfuse.demo import DemoSettings, evaluate, prepare_demo  # noqa: E402
from pyfuse.ops import DEFAULT_TEMPERATURE  # noqa: E402
from pyfuse.taskvectors import TaskVectors  # noqa: E402

# The authors' CLIP setting (fusion_bench's Concrete AdaMerging): coefficients not clamped, inner step Adam 1,
# temperature 0.5, Adam on the coefficients and the mask logits at 1/steps and 2/steps (a coefficient moves by up to
# ~1 over a run, a logit by up to ~2: Adam's step is about its lr). Every variant below spells out each of these
# settings (the demo's defaults, which change, are never read), so a row's label stays true.
AUTHORS_CLIP: dict[str, Any] = {"clamp": False, "inner_optimizer": "adam", "inner_lr": 1.0,
                                "temperature": DEFAULT_TEMPERATURE, "lr_movement": 1.0, "mask_movement": 2.0}
# the authors' language (Flan-T5) setting: Adam 1e-4 x 1000 AdaMerging steps, inner Adam 0.1, mask Adam 1e-4 x 2000
# meta steps, clamped; as totals over the schedule
LANGUAGE: dict[str, Any] = {**AUTHORS_CLIP, "clamp": True, "inner_lr": 0.1, "lr_movement": 0.1, "mask_movement": 0.2}
SETTINGS = ("clamp", "inner_optimizer", "inner_lr", "temperature")
"""Every variant names each of these, and either `lr` or `lr_movement` and either `mask_lr` or `mask_movement`
(`steps` optional: the schedule's length, `--steps` otherwise)."""

# name: (method, its settings, evaluation masks)
VARIANTS: dict[str, tuple[str, dict[str, Any], tuple[str, ...]]] = {
    "adamerging": ("adamerging", AUTHORS_CLIP, ()),
    "adamerging_clamp": ("adamerging", {**AUTHORS_CLIP, "clamp": True}, ()),
    "authors_fusion_bench": ("concrete_adamerging", AUTHORS_CLIP, ("relaxed",)),
    "clamp": ("concrete_adamerging", {**AUTHORS_CLIP, "clamp": True}, ("relaxed", "hard", "threshold", "expected")),
    "inner_adam_0.1": ("concrete_adamerging", {**AUTHORS_CLIP, "inner_lr": 0.1}, ("relaxed",)),
    "inner_sgd_1": ("concrete_adamerging", {**AUTHORS_CLIP, "inner_optimizer": "sgd", "inner_lr": 1.0}, ("relaxed",)),
    "clamp_inner_adam_0.1": ("concrete_adamerging", {**AUTHORS_CLIP, "clamp": True, "inner_lr": 0.1}, ("relaxed",)),
    "clamp_T1": ("concrete_adamerging", {**AUTHORS_CLIP, "clamp": True, "temperature": 1.0}, ("relaxed",)),
    "clamp_T0.2": ("concrete_adamerging", {**AUTHORS_CLIP, "clamp": True, "temperature": 0.2}, ("relaxed",)),
    "clamp_paper_lrs": ("concrete_adamerging", {**{k: AUTHORS_CLIP[k] for k in SETTINGS}, "clamp": True,
                                                "mask_lr": 1e-3, "lr": 1e-3}, ("relaxed",)),
    "clamp_150_steps": ("concrete_adamerging", {**AUTHORS_CLIP, "clamp": True, "steps": 150}, ("relaxed",)),
    "authors_fusion_bench_150_steps": ("concrete_adamerging", {**AUTHORS_CLIP, "steps": 150}, ("relaxed",)),
    "language_adamerging": ("adamerging", LANGUAGE, ()),
    "language": ("concrete_adamerging", LANGUAGE, ("relaxed",)),
    # the demo's default: the language setting with the CLIP setting's mask total
    "language_clip_mask": ("concrete_adamerging", {**LANGUAGE, "mask_movement": 2.0}, ("relaxed",)),
    "language_T1": ("concrete_adamerging", {**LANGUAGE, "temperature": 1.0}, ("relaxed",)),
    "language_T0.2": ("concrete_adamerging", {**LANGUAGE, "temperature": 0.2}, ("relaxed",)),
}


def variant_schedule(name: str, default_steps: int) -> dict[str, Any]:
    """The variant's settings resolved for a run: `steps`, `lr`, `mask_lr` (from the movements over the steps
    where the variant gives those) and each of `SETTINGS`; nothing taken from the demo's defaults."""
    chosen = VARIANTS[name][1]
    steps = chosen.get("steps", default_steps)
    return {"steps": steps, **{key: chosen[key] for key in SETTINGS},
            "lr": chosen["lr"] if "lr" in chosen else chosen["lr_movement"] / steps,
            "mask_lr": chosen["mask_lr"] if "mask_lr" in chosen else chosen["mask_movement"] / steps}


def run_variant(ctx, name: str, seed: int, backend: str, eval_masks: set[str] | None) -> list[dict[str, Any]]:
    method, _, masks = VARIANTS[name]
    masks = tuple(m for m in masks if eval_masks is None or m in eval_masks) or masks[:1]
    chosen = variant_schedule(name, ctx.settings.steps)
    steps, mask_lr = chosen["steps"], chosen["mask_lr"]
    common = {"coefficients": "layer", "lr": chosen["lr"], "seed": seed, "clamp": chosen["clamp"]}
    tasks = ctx.adaptation(seed)
    vectors = ctx.task_vectors()
    options = RunOptions(progress=False, backend=backend, checkpoint_every=0, eval_start=False)
    base = {"variant": name, "method": method, "seed": seed, **chosen}
    if method == "adamerging":
        clock = time.perf_counter()
        settings = Settings(method=method, adapt_steps=steps, **common)
        result = AdaptiveLoop(ctx.encoder.module, vectors, tasks, settings, options).run()
        return [{**base, "eval_mask": None, **_final(ctx, result, tasks), "seconds": time.perf_counter() - clock}]

    clock = time.perf_counter()
    meta = Settings(method=method, meta_steps=steps, inner_steps=1, mask_lr=mask_lr, eval_mask="relaxed",
                    inner_lr=chosen["inner_lr"], inner_optimizer=chosen["inner_optimizer"],
                    temperature=chosen["temperature"], **common)
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
        settings = Settings(method=method, adapt_steps=steps, eval_mask=eval_mask, temperature=chosen["temperature"],
                            **common)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {', '.join(VARIANTS)}")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=DemoSettings().steps, help="schedule length (both phases)")
    parser.add_argument("--test-limit", type=int, default=None, help="first N test examples per task (default all)")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--eval-masks", help="only these of a variant's evaluation masks (default all)")
    parser.add_argument("--json", help="write every run and the summary here (rewritten after every run)")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
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
    record = provenance()
    rows: list[dict[str, Any]] = []
    for variant in variants:
        for seed in seeds:
            for row in run_variant(ctx, variant, seed, args.backend, eval_masks):
                rows.append(row)
                print(f"{variant:32s} seed {seed} eval {str(row['eval_mask']):9s} avg {100 * row['average']:.1f} "
                      + " ".join(f"{100 * v:.1f}" for v in row["accuracy"].values())
                      + f"  share {max(row['class_share'].values()):.2f}  {row['seconds']:.0f} s", flush=True)
                write_json(args.json, {"benchmark": "ablation", "provenance": record, "seeds": seeds,
                                       "variants": {v: {"method": VARIANTS[v][0], **variant_schedule(v, settings.steps)}
                                                    for v in variants},
                                       "settings": dataclasses.asdict(settings), "runs": rows,
                                       "summary": summarise(rows)})
    print()
    for s in summarise(rows):
        std = "" if s["average_std"] is None else f" ± {100 * s['average_std']:.1f}"
        print(f"{s['variant']:32s} {str(s['eval_mask']):9s} {100 * s['average']:.1f}{std}  worst {s['worst_task']} "
              f"{100 * s['accuracy'][s['worst_task']]:.1f}  max share {s['max_class_share']:.2f}")


if __name__ == "__main__":
    main()
