"""The interface every merging method shares: the registry, declared parameters (`Param`) and their checks,
`Method` and the static-merge interface (`StaticMethod`, `Chunk`, `MergeContext`). `pyfuse.methods` re-exports
it and registers the built-in methods.

Any method is a `Method` subclass with a `name` and a `params` table, its declared parameters (`Param`:
default, check, help), registered with `@register`; `create_method(name, **parameters)` checks the values
against it, with errors that name the method and the parameter, into `method.parameters`. Where a new
method goes (docs/development.md, "Adding a method"):

- static (data-free): a `StaticMethod` (below) in its own module here, e.g. `ties.py`; sparsifying methods
  build on the shared core `sparsify.py`;
- data-aware (per-model statistics): a `data_aware.DataMethod`, e.g. `fisher.py`;
- adaptive (learned at test time on unlabeled batches): a `learned.AdaptiveMethod` in `learned.py`,
  which hands its settings to the engine in `pyfuse.adaptive`.

Static (data-free) methods subclass `StaticMethod` and merge chunk by chunk, so one piece of code serves
a state dict in memory and a checkpoint streamed from disk alike:

1. `bind(layout, n)` checks the parameters against the models (before any tensor data is read);
2. `prepare(ctx)` may take global passes over the whole model (TIES' whole-model thresholds);
3. for each tensor, `plan(ctx, index)` may take passes over that tensor (per-tensor thresholds);
4. `merge_chunk(chunk, plan)` returns the merged fp32 values of one chunk.

`ctx.map(fn, index)` reads base and fine-tuned models a bounded chunk at a time, as fp32 `Chunk`s, and
applies `fn` to each (possibly on several threads); `merge_chunk` is called the same way, so it must
not change the method's state.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch

from ..layout import FlatLayout
from ..ops import DEFAULT_TEMPERATURE

if TYPE_CHECKING:  # annotations only: the engine builds on this package
    from ..engine.plan import MergePlan

__all__ = [
    "Chunk", "MergeContext", "Method", "Param", "REQUIRED", "StaticMethod",
    "available_methods", "create_method", "get_method", "register", "refuse_tasks",
]


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()
_FLOAT32_MAX = torch.finfo(torch.float32).max
"""The default of a parameter that has none: leaving it out is an error."""


@dataclass(frozen=True)
class Param:
    """A declared parameter: its default, a check returning the normalised value (or raising), a help line.

    `path` marks a parameter naming a file, which configuration files give relative to themselves.
    """

    default: Any
    check: Callable[[Any], Any] | None = None
    help: str = ""
    path: bool = False


class Method:
    """A merging method: a registered `name`, declared `params`, and the validated values in `self.parameters`.

    Every kind answers for itself what the engine, the CLI, the config loader and the demo need to know, so
    none of them asks which class it holds: the registry metadata (`display_name`, `reference`, `kind`,
    `needs`, `runs_tasks`, `learns`, `stochastic`), `take_inputs` (the data it is given, checked before any
    work), `check_inputs(plan)` (against the models' headers), `peak_bytes(plan)` and how it merges
    (`streams`: chunk by chunk; otherwise `merge_in_memory`).
    """

    name: ClassVar[str]
    summary: ClassVar[str] = ""
    params: ClassVar[dict[str, Param]] = {}
    #: how tables and figures name the method (default: `name`)
    display_name: ClassVar[str] = ""
    #: the paper (or implementation) the method follows
    reference: ClassVar[str] = ""
    #: "static", "data" (per-model statistics), "task-data" (runs the models on the tasks) or "adaptive"
    kind: ClassVar[str] = ""
    #: the statistics kinds a merge needs, one `Statistics` per fine-tuned model (an instance may need fewer)
    needs: tuple[str, ...] = ()
    #: runs the model on the tasks' data: takes one `pyfuse.Task` per fine-tuned model and the model
    runs_tasks: ClassVar[bool] = False
    #: learned at test time from the tasks' unlabeled data (`learned.AdaptiveMethod`)
    learns: ClassVar[bool] = False
    #: the result depends on a seed: the method's own noise, or the data it is learned or measured on
    stochastic: ClassVar[bool] = False
    #: merges chunk by chunk on the streaming engine; otherwise the whole model in memory (`merge_in_memory`)
    streams: ClassVar[bool] = False
    #: one call of the fused op over a flat buffer of task vectors (`fused_mask`), so LoRA factors stay factored
    fused: ClassVar[bool] = False
    #: a distributed merge gives each process's whole-model passes only its own tensors (see `StaticMethod`)
    split_global_passes: ClassVar[bool] = False

    def __init__(self, **parameters: Any) -> None:
        self.parameters = resolve_params(self.name, self.params, parameters)

    @property
    def config(self) -> dict[str, Any]:
        """Deprecated name of `parameters` (the values); goes in the next release."""
        warnings.warn(f"{type(self).__name__}.config is now .parameters", DeprecationWarning, stacklevel=2)
        return self.parameters

    @classmethod
    def label(cls) -> str:
        """The name tables and figures show."""
        return cls.display_name or cls.name

    @classmethod
    def inputs_note(cls) -> str:
        """What the method takes beyond the models, as `pyfuse merge --help` lists it ("" for nothing)."""
        return ""

    @classmethod
    def take_inputs(cls, statistics: Any, tasks: Any, model: Any, base: Any) -> tuple[Any, Any, Any]:
        """The statistics, tasks and model a merge of the engine takes, checked and normalised before any work
        (statistics files loaded, the model defaulted); raises naming what is missing or extra."""
        raise ValueError(f"{cls.name!r} is not a static merge (it needs data); use its own entry point")

    def check_inputs(self, plan: MergePlan) -> None:
        """Check the parameters and inputs against the models' headers (nothing read) and bind to them."""
        raise NotImplementedError

    def peak_bytes(self, plan: MergePlan) -> int:
        """The working set of the merge beyond the process's baseline, before the allocator's slack."""
        raise NotImplementedError

    @property
    def merges_whole_model(self) -> bool:
        """Whether the merge needs every tensor at once (so a distributed merge leaves it to rank 0)."""
        return not self.streams

    def merge_in_memory(self, plan: MergePlan, models: list[Mapping[str, torch.Tensor]],
                        keys: Sequence[str] | None, progress: bool) -> dict[str, torch.Tensor]:
        """A non-streaming method's merged tensors (those at `keys`, default all), the inputs read lazily."""
        raise NotImplementedError

    def fused_mask(self, device: torch.device, numel: int) -> tuple[torch.Tensor, dict[str, Any]]:
        """A `fused` method's mask logits `[D]` and the fused op's mask options."""
        raise NotImplementedError

    def global_passes(self) -> int:
        """How many passes over the whole model the merge takes before merging; for predictions and reports."""
        return 0

    def tensor_passes(self) -> int:
        """At most how many passes over a tensor the merge takes before it is merged; for reports."""
        return 0


def refuse_tasks(name: str, tasks: Any, model: Any) -> None:
    """Raise if a method that does not run the model is given tasks or a model."""
    if tasks is not None or model is not None:
        raise ValueError(f"{name!r} takes no tasks or model; they are for methods that run the models on the "
                         "tasks' data (regmean++)")


def resolve_params(method: str, declared: Mapping[str, Param], given: Mapping[str, Any]) -> dict[str, Any]:
    """Defaults filled in and every value checked; errors name the method and the parameter."""
    unknown = sorted(set(given) - set(declared))
    if unknown:
        raise ValueError(
            f"{method}: unknown parameter{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
            f"accepted: {', '.join(declared) or 'none'}"
        )
    resolved = {}
    for key, spec in declared.items():
        value = given.get(key, spec.default)
        if value is None and spec.default is not None:  # YAML `key: null` or key=None: not a value of the parameter
            raise ValueError(f"{method}: parameter {key!r} is null; give a value or leave it out for the default"
                             f"{'' if spec.default is REQUIRED else f' ({spec.default})'}")
        if value is REQUIRED:
            raise ValueError(f"{method}: parameter {key!r} is required ({spec.help})")
        if spec.check is not None and value is not None:
            try:
                value = spec.check(value)
            except (TypeError, ValueError) as err:
                raise ValueError(f"{method}: {key} {err}") from None
        resolved[key] = value
    return resolved


# ---------------------------------------------------------------------------------------------
# Checks for declared parameters: each returns the normalised value or raises with what was expected.
# ---------------------------------------------------------------------------------------------
def number(low: float | None = None, high: float | None = None, *, low_open: bool = False,
           high_open: bool = False) -> Callable[[Any], float]:
    """A finite real number in the given (optionally open) interval, within float32's range (merges run in fp32)."""
    lo = "(" if low_open else "["
    hi = ")" if high_open else "]"
    where = f" in {lo}{'-inf' if low is None else low}, {'inf' if high is None else high}{hi}"

    def check(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise TypeError(f"must be a finite number{where if low is not None or high is not None else ''}, "
                            f"got {value!r}")
        if abs(value) > _FLOAT32_MAX:
            raise ValueError(f"must be within float32's range (|x| <= {_FLOAT32_MAX:.4g}), got {value!r}")
        if (low is not None and (value < low or (low_open and value == low))) or (
            high is not None and (value > high or (high_open and value == high))
        ):
            raise ValueError(f"must be{where}, got {value!r}")
        return float(value)

    return check


def integer(low: int, high: int) -> Callable[[Any], int]:
    """An integer in [low, high)."""

    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value < high:
            raise ValueError(f"must be an integer in [{low}, {high}), got {value!r}")
        return value

    return check


def choice(*options: str) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if value not in options:
            raise ValueError(f"must be one of {', '.join(map(repr, options))}, got {value!r}")
        return value

    return check


def boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"must be true or false, got {value!r}")
    return value


def numbers(value: Any) -> tuple[float, ...]:
    """A non-empty list of finite numbers (per-model weights)."""
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value:
        raise TypeError(f"must be a non-empty list of numbers, got {value!r}")
    return tuple(number()(v) for v in value)


def positive(value: Any) -> float:
    """A finite number > 0."""
    value = number()(value)
    if value <= 0:
        raise ValueError(f"must be > 0, got {value!r}")
    return value


def tensor_names(value: Any) -> tuple[str, ...]:
    """A list of tensor names (possibly empty); `check_names` checks them against the model in `bind`."""
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)) or not all(
            isinstance(v, str) for v in value):
        raise TypeError(f"must be a list of tensor names, got {value!r}")
    return tuple(value)


def check_names(method: str, key: str, names: Sequence[str], layout: FlatLayout) -> None:
    """Raise unless every name in parameter `key` is a merged tensor of the layout."""
    unknown = [name for name in names if name not in set(layout.names)]
    if unknown:
        raise ValueError(f"{method}: {key} names {unknown[0]!r}, which is not a floating tensor of the base model")


WEIGHTS = Param(None, numbers, "per-model weights, one per fine-tuned model (default: all 1)")
TEMPERATURE = Param(DEFAULT_TEMPERATURE, positive, "Concrete temperature T, > 0")


# ---------------------------------------------------------------------------------------------
# The registry
# ---------------------------------------------------------------------------------------------
_METHODS: dict[str, type[Method]] = {}
METHOD_KINDS = ("static", "data", "task-data", "adaptive")


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make `cls` available under `cls.name`."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__name__} must set a non-empty string `name` to be registered")
    if name in _METHODS and _METHODS[name] is not cls:
        raise ValueError(f"method {name!r} is already registered by {_METHODS[name].__qualname__}")
    if cls.kind not in METHOD_KINDS:
        raise TypeError(f"{cls.__name__}.kind must be one of {', '.join(METHOD_KINDS)}, got {cls.kind!r}; subclass "
                        "StaticMethod, data_aware.DataMethod, data_aware.TaskDataMethod or learned.AdaptiveMethod")
    for key, spec in cls.params.items():
        if not isinstance(spec, Param):
            raise TypeError(f"{cls.__name__}.params[{key!r}] must be a Param, got {type(spec).__name__}")
    _METHODS[name] = cls
    return cls


def available_methods() -> list[str]:
    return sorted(_METHODS)


def get_method(name: str) -> type[Method]:
    if not isinstance(name, str):
        raise ValueError(f"the merge method must be a name such as 'ties', got {name!r}")
    try:
        return _METHODS[name]
    except KeyError:
        adaptive = [m for m in available_methods() if _METHODS[m].learns]
        merges = [m for m in available_methods() if not _METHODS[m].learns]
        raise ValueError(f"unknown merge method {name!r}; available: {', '.join(merges)}; adaptive (learned on "
                         f"unlabeled task data): {', '.join(adaptive)}") from None


def create_method(name: str, **params: Any) -> Method:
    """An instance of the registered method `name` with validated parameters."""
    return get_method(name)(**params)


# ---------------------------------------------------------------------------------------------
# The static-merge interface
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Chunk:
    """A contiguous piece of one tensor: flat fp32 values, read-only (they may be views of the inputs).

    `index` is the tensor's position in the layout, `start` the global flat index of the first element
    (so `start - layout.offsets[index]` is the position inside the tensor).
    """

    index: int
    start: int
    base: torch.Tensor
    deltas: torch.Tensor  # [n, c]: fine-tuned minus base

    def __len__(self) -> int:
        return self.base.numel()


class MergeContext(Protocol):
    """What a static method may read: the layout, the number of models, and its chunks through `map`."""

    layout: FlatLayout
    n: int
    device: torch.device
    threads: int  # torch threads a `plan` may use between its passes (the engine's workers are idle then)

    def map(self, fn: Callable[[Chunk], Any], index: int | None = None, desc: str | None = None) -> Iterator[Any]:
        """`fn(chunk)` for every chunk of tensor `index` (or of all tensors, in layout order), in order.

        `fn` may run on worker threads, several chunks at once: it must not keep the chunk or share state
        it writes to; reduce its results in the caller. `desc` labels a progress bar for whole-model passes.
        With `index=None` under torch.distributed, a method whose `split_global_passes` is set sees only this
        process's tensors, and combines the results of its passes with `sum_over_ranks`.
        """
        ...

    def sum_over_ranks(self, value: torch.Tensor) -> torch.Tensor:
        """`value` summed over the processes of a distributed merge (itself in one process); integer tensors
        only, whose sums do not depend on the order of addition."""
        ...


class StaticMethod(Method):
    """A data-free merge, computed chunk by chunk (see the module docstring)."""

    kind = "static"
    streams = True
    #: fp32 chunk-sized temporaries alive at the method's peak, as (per model, constant); for predictions
    temporaries: ClassVar[tuple[int, int]] = (1, 2)
    #: `prepare` sums its passes' partial results with `ctx.sum_over_ranks`, so a distributed merge gives each
    #: process's passes only its own tensors; otherwise every process passes over the whole model
    split_global_passes: ClassVar[bool] = False

    @classmethod
    def take_inputs(cls, statistics: Any, tasks: Any, model: Any, base: Any) -> tuple[None, None, None]:
        refuse_tasks(cls.name, tasks, model)
        if statistics is not None:
            raise ValueError(f"{cls.name!r} is a static merge; it takes no statistics")
        return None, None, None

    def check_inputs(self, plan: MergePlan) -> None:
        self.bind(plan.layout, len(plan.models))

    def peak_bytes(self, plan: MergePlan) -> int:
        """Per worker, one chunk's deltas and fp32 base and the method's chunk-sized temporaries; the merged
        chunks waiting to be written; the method's tables."""
        n = len(plan.models)
        per_model, constant = self.temporaries
        chunk = min(plan.chunk_elements, max(shape.numel() for shape in plan.layout.shapes)) * 4
        in_flight = 2 * plan.workers
        working = plan.workers * chunk * (n + 1 + per_model * n + constant) + in_flight * chunk
        return working + self.state_bytes(plan.layout, n, in_flight)

    def bind(self, layout: FlatLayout, n: int) -> None:
        """Check the parameters against the layout and the number of models; resolve per-model weights."""
        weights = self.parameters.get("weights")
        if weights is not None and len(weights) != n:
            raise ValueError(f"{self.name}: weights has {len(weights)} entries, expected one per fine-tuned "
                             f"model ({n})")
        self.weights = torch.tensor(weights if weights is not None else [1.0] * n, dtype=torch.float32)

    def prepare(self, ctx: MergeContext) -> None:
        """Passes over the whole model before merging; none by default."""

    def plan(self, ctx: MergeContext, index: int) -> Any:
        """Whatever `merge_chunk` needs about tensor `index` (read through `ctx.map`); nothing by default."""
        return None

    def merge_chunk(self, chunk: Chunk, plan: Any) -> torch.Tensor:
        """The merged values of the chunk, fp32 `[c]`, on the chunk's device; may run on worker threads."""
        raise NotImplementedError

    def state_bytes(self, layout: FlatLayout, n: int, in_flight: int) -> int:
        """Memory the method holds beyond chunk temporaries (tables, and per-chunk partial results of its
        passes, `in_flight` of which may be waiting at once); for predictions."""
        return 0

    def chunk_unit(self, shape: torch.Size) -> int:
        """Chunks of a tensor of this shape hold a whole multiple of this many elements (at least one such
        block, even above the engine's chunk size): 1 by default; DELLA ranks within rows, so it asks for
        whole rows."""
        return 1
