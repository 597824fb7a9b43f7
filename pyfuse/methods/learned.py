"""Adaptive (test-time) methods: registered like every other method, they learn merge coefficients and/or a
Concrete mask from the tasks' unlabeled data by entropy minimisation (docs/adaptive-methods.md).

A method is an `AdaptiveMethod` with a `params` table; `settings()` turns its validated parameters into the
engine's `Settings` and `run(model, task_vectors, tasks, options)` hands them to `pyfuse.adaptive`'s loop.
The functions `adamerging`, `adamerging_pp`, `concrete_task_arithmetic`, `concrete_adamerging` and `concrete_tsvm`
are the Python entries: `adamerging(model, task_vectors, tasks, steps=500, options=RunOptions(...))`.

The Concrete methods learn their mask over the per-task vectors their `vectors` parameter names
(`vector_sources`): the raw task vectors, TIES' trimmed ones (as AdaMerging++) or TSV-M's decorrelated ones (as
fusion_bench's Concrete TSV-M, registered here as `concrete_tsvm`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from ..adaptive.loop import EVAL_MASKS, INNER_OPTIMIZERS, AdaptiveLoop, MergeResult, RunOptions, Settings
from ..adaptive.merger import EVAL_STEP
from ..task import Task
from ..taskvectors import TaskVectors
from .base import TEMPERATURE, Method, Param, boolean, choice, integer, number, register, tensor_names
from .vector_sources import VECTOR_SOURCES, source_help, source_vectors

__all__ = ["AdaptiveMethod", "MergeResult", "RunOptions", "adamerging", "adamerging_pp", "concrete_adamerging",
           "concrete_task_arithmetic", "concrete_tsvm"]


def _granularity(value: Any) -> str:
    if value not in ("task", "layer"):
        raise ValueError(f"must be 'task' (one coefficient per task) or 'layer', got {value!r}")
    return value


# parameters several methods share, each declared once
GRANULARITY = Param("layer", _granularity, "task: one coefficient per task; layer: one per task and tensor")
LR = Param(1e-3, number(0), "Adam learning rate of the coefficients")
INIT = Param(0.3, number(), "initial (and reset) value of every coefficient")
CLAMP = Param(False, boolean, "clamp the coefficients to [0, 1] inside the merge (AdaMerging's code)")
MASK_LR = Param(1e-3, number(0), "Adam learning rate of the mask logits")
EVAL_MASK = Param("relaxed", choice(*EVAL_MASKS), "the mask sample the merged model uses: relaxed | hard | threshold")
RESCALE = Param(True, boolean, "divide the mask by its mean over each tensor")
SEED = Param(0, integer(0, 2**64), "Philox key of the mask noise")
TIES_DENSITY = 0.2  # AdaMerging++'s
VECTORS = Param("raw", choice(*VECTOR_SOURCES), f"the per-task vectors the mask is learned over: {source_help()}")
SOURCE_DENSITY = Param(None, number(0, 1, low_open=True), f"vectors=ties only: fraction of each task vector TIES "
                                                          f"keeps, in (0, 1] (default {TIES_DENSITY})")
SOURCE_EXCLUDE_KEYS = Param((), tensor_names, "vectors=tsv only: matrices that get the mean task vector instead "
                                              "(TSV-M's exclude_keys)")


def _steps(default: int, what: str) -> Param:
    return Param(default, integer(0, EVAL_STEP), what)


class AdaptiveMethod(Method):
    """A merge learned at test time on the tasks' unlabeled batches (`pyfuse.Task`s), one task per vector."""

    kind = "adaptive"
    learns = True
    runs_tasks = True
    stochastic = True  # batch order and mask noise

    @classmethod
    def inputs_note(cls) -> str:
        return "[adaptive: tasks, --trust-code]"

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        try:  # the engine's checks across parameters, before any model is loaded
            self.settings()
        except ValueError as err:
            raise ValueError(f"{self.name}: {err}") from None

    def settings(self) -> Settings:
        """The engine's settings for these parameters."""
        raise NotImplementedError

    @property
    def vector_source(self) -> str:
        """Which per-task vectors the loop merges (`vector_sources.VECTOR_SOURCES`)."""
        return self.parameters.get("vectors", "raw")

    @property
    def loads_shard(self) -> bool:
        """Whether a rank of a distributed run may load only its shard of the task vectors (`pyfuse.runner`); not
        when its vectors are computed over the whole model."""
        return self.vector_source == "raw"

    def source_settings(self) -> dict[str, Any]:
        """The vector source's part of the engine's settings (`vectors`, `density`, `exclude_keys`), checked."""
        c, source = self.parameters, self.vector_source
        density, exclude_keys = c.get("density"), c.get("exclude_keys", ())
        if density is not None and source != "ties":
            raise ValueError(f"density applies to vectors='ties' only, not {source!r}")
        if exclude_keys and source != "tsv":
            raise ValueError(f"exclude_keys applies to vectors='tsv' only, not {source!r}")
        if source == "ties" and density is None:
            density = TIES_DENSITY
        return {"vectors": source, "density": density, "exclude_keys": exclude_keys}

    def vectors(self, task_vectors: TaskVectors) -> TaskVectors:
        """The per-task vectors the loop merges: those of `vector_source`, computed from the given ones."""
        source = self.source_settings()
        return source_vectors(task_vectors, source["vectors"], self.name.replace("++", "_pp"),
                              density=source["density"], exclude_keys=source["exclude_keys"])

    def run(self, model: torch.nn.Module, task_vectors: TaskVectors, tasks: Sequence[Task],
            options: RunOptions | None = None) -> MergeResult:
        return AdaptiveLoop(model, self.vectors(task_vectors), tasks, self.settings(), options).run()


@register
class AdaMerging(AdaptiveMethod):
    """AdaMerging (Yang et al., 2024): coefficients learned by entropy minimisation (Adam `lr`)."""

    name = "adamerging"
    display_name = "AdaMerging"
    reference = "Yang et al., 2024, AdaMerging: Adaptive Model Merging for Multi-Task Learning"
    summary = "task- or layer-wise coefficients learned by entropy minimisation on unlabeled test batches"
    params: ClassVar[dict[str, Param]] = {
        "granularity": GRANULARITY, "steps": _steps(1000, "Adam steps on the coefficients"), "lr": LR,
        "init": INIT, "clamp": CLAMP,
    }

    def settings(self) -> Settings:
        c = self.parameters
        return Settings(method=self.name, coefficients=c["granularity"], adapt_steps=c["steps"], lr=c["lr"],
                        init=c["init"], clamp=c["clamp"], **self.source_settings())


@register
class AdaMergingPlusPlus(AdaMerging):
    """AdaMerging++: AdaMerging over the TIES-trimmed, sign-agreeing task vectors (`sparsify.ties_trim`)."""

    name = "adamerging++"
    display_name = "AdaMerging++"
    reference = "Yang et al., 2024, AdaMerging: Adaptive Model Merging for Multi-Task Learning"
    summary = "AdaMerging over the TIES-trimmed, sign-agreeing task vectors"
    params: ClassVar[dict[str, Param]] = {
        "density": Param(TIES_DENSITY, number(0, 1, low_open=True), "fraction of each task vector TIES keeps, in "
                                                                     "(0, 1]"),
        **AdaMerging.params,
    }

    @property
    def vector_source(self) -> str:
        return "ties"


@register
class ConcreteTaskArithmetic(AdaptiveMethod):
    """Concrete Task Arithmetic (Algorithms 1 and 2): task arithmetic with `scale` fixed; only the mask logits
    are learned. The merged model uses the `eval_mask` sample."""

    name = "concrete_task_arithmetic"
    display_name = "Concrete TA"
    reference = ("Tang et al., 2023, Concrete Subspace Learning for Multi-task Model Fusion; vectors=ties/tsv: "
                 "over TIES' (as AdaMerging++) or TSV-M's per-task vectors (as fusion_bench's Concrete TSV-M)")
    summary = "task arithmetic (fixed scale) under a shared Concrete mask learned on unlabeled test batches"
    params: ClassVar[dict[str, Param]] = {
        "scale": Param(0.3, number(), "lambda, the fixed coefficient of every task vector"),
        "steps": _steps(2000, "Adam steps on the mask logits"), "mask_lr": MASK_LR, "temperature": TEMPERATURE,
        "eval_mask": EVAL_MASK, "rescale": RESCALE, "seed": SEED, "vectors": VECTORS, "density": SOURCE_DENSITY,
        "exclude_keys": SOURCE_EXCLUDE_KEYS,
    }

    def settings(self) -> Settings:
        c = self.parameters
        return Settings(method=self.name, coefficients="fixed", meta_steps=c["steps"], init=c["scale"],
                        mask_lr=c["mask_lr"], temperature=c["temperature"], seed=c["seed"],
                        eval_mask=c["eval_mask"], rescale=c["rescale"], **self.source_settings())


@register
class ConcreteTSVM(ConcreteTaskArithmetic):
    """fusion_bench's Concrete TSV-M (`ConcreteTSVMForOpenCLIP`): Concrete Task Arithmetic over TSV-M's
    decorrelated per-task vectors, each at the fixed coefficient `scale` (its `alpha`, 1), with its schedule
    (2000 steps, mask lr 1e-3, temperature 0.5, the relaxed evaluation mask). fusion_bench steps the logits with
    AdamW (weight decay 0.01); here Adam, as every Concrete method."""

    name = "concrete_tsvm"
    display_name = "Concrete TSV-M"
    reference = ("fusion_bench's Concrete TSV-M (ConcreteTSVMForOpenCLIP): Tang et al., 2023, Concrete Subspace "
                 "Learning, over Gargiulo et al., 2025, Task Singular Vectors")
    summary = "Concrete TA over TSV-M's decorrelated per-task vectors (fusion_bench's Concrete TSV-M)"
    params: ClassVar[dict[str, Param]] = {
        **{key: spec for key, spec in ConcreteTaskArithmetic.params.items() if key not in ("vectors", "density")},
        "scale": Param(1.0, number(), "the fixed coefficient of every per-task vector (fusion_bench's `alpha`)"),
    }

    @property
    def vector_source(self) -> str:
        return "tsv"


@register
class ConcreteAdaMerging(AdaptiveMethod):
    """Concrete AdaMerging (Algorithms 1 and 3): learn the shared mask with the bi-level loop (inner steps on
    the coefficients, `inner_optimizer` at `inner_lr`; outer steps on the logits, Adam `mask_lr`), then fix the
    `eval_mask` sample and run AdaMerging (Adam `lr`) for `adamerging_steps`. The defaults are the CLIP ones;
    the authors use `inner_lr=0.1, mask_lr=1e-4` for Flan-T5."""

    name = "concrete_adamerging"
    display_name = "Concrete AM"
    reference = ConcreteTaskArithmetic.reference
    summary = "Concrete mask learned by the bi-level loop, then AdaMerging under the fixed mask"
    params: ClassVar[dict[str, Param]] = {
        "granularity": GRANULARITY,
        "meta_steps": _steps(2000, "outer steps of the bi-level loop (mask logits)"),
        "adamerging_steps": _steps(1000, "AdaMerging steps under the fixed mask"),
        "inner_steps": Param(1, integer(1, 2**31), "inner steps on the coefficients per outer step"),
        "inner_lr": Param(1.0, number(0), "learning rate of the inner steps"),
        "inner_optimizer": Param("adam", choice(*INNER_OPTIMIZERS), "optimizer of the inner steps: adam | sgd"),
        "mask_lr": MASK_LR, "lr": LR, "init": INIT, "clamp": CLAMP, "temperature": TEMPERATURE,
        "eval_mask": EVAL_MASK, "rescale": RESCALE, "seed": SEED, "vectors": VECTORS, "density": SOURCE_DENSITY,
        "exclude_keys": SOURCE_EXCLUDE_KEYS,
    }

    def settings(self) -> Settings:
        c = self.parameters
        return Settings(method=self.name, coefficients=c["granularity"], meta_steps=c["meta_steps"],
                        inner_steps=c["inner_steps"], adapt_steps=c["adamerging_steps"], init=c["init"],
                        clamp=c["clamp"], inner_lr=c["inner_lr"], inner_optimizer=c["inner_optimizer"],
                        mask_lr=c["mask_lr"], lr=c["lr"], temperature=c["temperature"], seed=c["seed"],
                        eval_mask=c["eval_mask"], rescale=c["rescale"], **self.source_settings())


# ---------------------------------------------------------------------------------------------
# The Python entries: keyword parameters as in each class's `params` table
# ---------------------------------------------------------------------------------------------
def adamerging(model: torch.nn.Module, task_vectors: TaskVectors, tasks: Sequence[Task], *,
               options: RunOptions | None = None, **params: Any) -> MergeResult:
    """AdaMerging; parameters (granularity, steps, lr, init, clamp) as in `AdaMerging.params`."""
    return AdaMerging(**params).run(model, task_vectors, tasks, options)


def adamerging_pp(model: torch.nn.Module, task_vectors: TaskVectors, tasks: Sequence[Task], *,
                  options: RunOptions | None = None, **params: Any) -> MergeResult:
    """AdaMerging++; parameters (density and AdaMerging's) as in `AdaMergingPlusPlus.params`."""
    return AdaMergingPlusPlus(**params).run(model, task_vectors, tasks, options)


def concrete_task_arithmetic(model: torch.nn.Module, task_vectors: TaskVectors, tasks: Sequence[Task], *,
                             options: RunOptions | None = None, **params: Any) -> MergeResult:
    """Concrete Task Arithmetic; parameters as in `ConcreteTaskArithmetic.params`."""
    return ConcreteTaskArithmetic(**params).run(model, task_vectors, tasks, options)


def concrete_adamerging(model: torch.nn.Module, task_vectors: TaskVectors, tasks: Sequence[Task], *,
                        options: RunOptions | None = None, **params: Any) -> MergeResult:
    """Concrete AdaMerging; parameters as in `ConcreteAdaMerging.params`."""
    return ConcreteAdaMerging(**params).run(model, task_vectors, tasks, options)


def concrete_tsvm(model: torch.nn.Module, task_vectors: TaskVectors, tasks: Sequence[Task], *,
                  options: RunOptions | None = None, **params: Any) -> MergeResult:
    """fusion_bench's Concrete TSV-M; parameters as in `ConcreteTSVM.params`."""
    return ConcreteTSVM(**params).run(model, task_vectors, tasks, options)
