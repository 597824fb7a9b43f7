"""`DataMethod`: the interface of data-aware merges (Fisher, RegMean, MaTS, ESM), which need per-task statistics;
`TaskDataMethod`: merges that run the models on the tasks' data themselves (RegMean++).

A data method declares the statistic kinds it `needs` and merges whole models in memory:
`merge_model(base, finetuned, stats)` checks everything first (one `Statistics` per fine-tuned model, the
needed kinds present for the same parameters in every model, every statistic shaped for its parameter),
then merges parameter by parameter through `merge_parameter`, whose `None` means "no statistics here":
the parameter is then averaged (`base + mean of the task vectors`, weighted by `weights`). Methods that
need more than one parameter at a time override `merge_model` itself (calling `check` first).

Models are mappings of tensors; `SourceTensors` presents a lazy `TensorSource` (a checkpoint on disk) as one,
so that a merge reads each tensor when it gets to it and checks shapes from the headers.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from ..io.sources import TensorSource, open_source
from ..layout import FlatLayout
from ..progress import progress_bar
from ..stats import KINDS, Statistics
from ..task import Task
from .base import Method, refuse_tasks

if TYPE_CHECKING:  # annotations only: the engine builds on this package
    from ..engine.plan import MergePlan

__all__ = ["DataMethod", "SourceTensors", "TaskDataMethod", "as_source", "expected_shape"]


class SourceTensors(Mapping):
    """A read-only mapping view of a `TensorSource`: tensors are read on access, shapes come from its headers.

    With `keys`, the view holds only those tensors (one process's share of a distributed merge); checks
    that reach the source through `.source` still see the whole model. With `device`, each tensor is handed
    out there as it is read (a merge computing on a GPU reads one tensor at a time onto it).
    """

    def __init__(self, source: TensorSource, keys: Sequence[str] | None = None,
                 device: torch.device | None = None):
        self.source, self.device = source, device
        self._keys = source.keys() if keys is None else list(keys)

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self.source.specs:
            raise KeyError(key)
        value = self.source.get(key)
        return value if self.device is None else value.to(self.device)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def as_source(model: Mapping[str, torch.Tensor] | TensorSource, label: str) -> TensorSource:
    """`model` as a lazy `TensorSource` (a `SourceTensors` view gives back its own, read nothing)."""
    if isinstance(model, SourceTensors):
        return model.source
    return open_source(model, label)


def expected_shape(kind: str, weight: torch.Size, transposed: bool, found: torch.Size) -> torch.Size | None:
    """The shape a `kind` statistic of a parameter shaped `weight` must have (`found` fixes acts' row count);
    None if the parameter cannot have one (the Linear kinds need a 2-D weight)."""
    if kind == "fisher":
        return weight
    if len(weight) != 2:
        return None
    out_features, in_features = (weight[1], weight[0]) if transposed else (weight[0], weight[1])
    if kind == "gram_in":
        return torch.Size([in_features, in_features])
    if kind == "gram_out":
        return torch.Size([out_features, out_features])
    return torch.Size([found[0] if len(found) else 0, in_features])  # acts: any number of rows


class DataMethod(Method):
    """A merge that needs per-task `Statistics` of the kinds in `needs` (see the module docstring)."""

    kind = "data"
    needs: tuple[str, ...] = ()
    stochastic = True  # statistics are measured on sampled data

    @classmethod
    def inputs_note(cls) -> str:
        return f"[statistics: {', '.join(cls.needs)}]"

    @classmethod
    def take_inputs(cls, statistics: Any, tasks: Any, model: Any, base: Any) -> tuple[list[Statistics], None, None]:
        refuse_tasks(cls.name, tasks, model)
        if statistics is None:
            raise ValueError(f"{cls.name!r} needs statistics=[...], one per fine-tuned model, with "
                             f"{', '.join(map(repr, cls.needs))} (see pyfuse.stats.collect_statistics)")
        if isinstance(statistics, (str, os.PathLike, Statistics)) or not isinstance(statistics, Sequence):
            raise ValueError(f"{cls.name}: statistics must be a list, one Statistics or file per fine-tuned model")
        return [st if isinstance(st, Statistics) else Statistics.load(st) for st in statistics], None, None

    def check_inputs(self, plan: MergePlan) -> None:
        self.check(plan.base, plan.models, plan.statistics)

    def peak_bytes(self, plan: MergePlan) -> int:
        """The merged model in memory and the per-parameter temporaries (`working_bytes`)."""
        return plan.output_bytes + self.working_bytes(plan.layout, len(plan.models))

    @property
    def merges_whole_model(self) -> bool:
        """Only a method that overrides `merge_model` needs every tensor at once; the others merge by parameter."""
        return type(self).merge_model is not DataMethod.merge_model

    def merge_in_memory(self, plan: MergePlan, models: list[Mapping[str, torch.Tensor]],
                        keys: Sequence[str] | None, progress: bool) -> dict[str, torch.Tensor]:
        for st, model, source in zip(plan.statistics, models, plan.models):
            st.check_model(model, source.label)
        device = plan.device  # inputs and statistics are read onto it one tensor at a time; results come back
        return self.merge_model(SourceTensors(plan.base, keys, device),
                                [SourceTensors(as_source(m, source.label), None, device)
                                 for m, source in zip(models, plan.models)],
                                [st.to(device) for st in plan.statistics], progress=progress)

    def check(self, base: Mapping[str, torch.Tensor] | TensorSource,
              finetuned: Sequence[Mapping[str, torch.Tensor] | TensorSource],
              stats: Sequence[Statistics]) -> FlatLayout:
        """Raise before any work unless the models and statistics fit; returns the layout of the floating tensors.

        Shapes come from headers (for files) and statistics are not read. Errors name the model or the
        statistics (task and file), the kind, the key and the shapes.
        """
        if isinstance(finetuned, (Mapping, TensorSource)) or not isinstance(finetuned, Sequence) or not finetuned:
            raise ValueError(f"{self.name}: finetuned must be a non-empty list of models")
        base_source = as_source(base, "base")
        sources = [as_source(m, f"fine-tuned model {i + 1}") for i, m in enumerate(finetuned)]
        layout = FlatLayout.for_models(base_source, sources)
        if isinstance(stats, Statistics) or not isinstance(stats, Sequence) or len(stats) != len(sources):
            got = "one Statistics" if isinstance(stats, Statistics) else (
                f"{len(stats)}" if isinstance(stats, Sequence) else type(stats).__name__)
            raise ValueError(f"{self.name}: needs statistics, one per fine-tuned model ({len(sources)}), got {got}")
        weights = self.parameters.get("weights")
        if weights is not None and len(weights) != len(sources):
            raise ValueError(f"{self.name}: weights has {len(weights)} entries, expected one per fine-tuned "
                             f"model ({len(sources)})")
        self.weights = torch.tensor(weights if weights is not None else [1.0] * len(sources), dtype=torch.float64)
        if float(self.weights.sum()) == 0:
            raise ValueError(f"{self.name}: weights sum to 0; their mean is undefined")
        shapes = dict(zip(layout.names, layout.shapes))
        for i, st in enumerate(stats):
            if not isinstance(st, Statistics):
                raise TypeError(f"{self.name}: statistics {i + 1} is a {type(st).__name__}, not a Statistics")
            who = f"{self.name}: statistics {i + 1} ({st.origin})"
            for kind in self.needs:
                if kind not in KINDS:
                    raise ValueError(f"{self.name}: needs unknown statistics kind {kind!r}")
                names = st.names(kind)
                if not names:
                    raise ValueError(f"{who}: no {kind!r} statistics (it has {', '.join(st.kinds()) or 'none'}); "
                                     f"collect them with kinds=[..., {kind!r}]")
                for key in names:
                    if key not in shapes:
                        raise KeyError(f"{who}: {kind!r} statistics for {key!r}, which is not a floating parameter "
                                       f"of the base model")
                    found = st.shape(kind, key)
                    expected = expected_shape(kind, shapes[key], key in st.transposed, found)
                    if expected is None or found != expected:
                        raise ValueError(f"{who}: {kind!r} statistics for {key!r} have shape {list(found)}, expected "
                                         f"{list(expected) if expected is not None else 'a 2-D weight'} for the "
                                         f"parameter of shape {list(shapes[key])}")
                if i:
                    first = set(stats[0].names(kind))
                    diff = sorted(first.symmetric_difference(names))
                    if diff:
                        holder = stats[0] if diff[0] in first else st
                        raise ValueError(f"{who}: the {kind!r} statistics cover other parameters than those of "
                                         f"statistics 1 (task {stats[0].task!r}): {diff[0]!r} is only in task "
                                         f"{holder.task!r}")
                    flipped = sorted(key for key in names if (key in st.transposed) != (key in stats[0].transposed))
                    if flipped:
                        raise ValueError(f"{who}: {flipped[0]!r} is stored transposed (Conv1D) in one of tasks "
                                         f"{stats[0].task!r} and {st.task!r} only; the models differ in architecture")
        return layout

    def prepare(self, base: Mapping[str, torch.Tensor], finetuned: Sequence[Mapping[str, torch.Tensor]],
                stats: Sequence[Statistics]) -> None:
        """Whole-model passes before merging (e.g. Fisher normalisation constants); none by default."""

    def merge_parameter(self, name: str, base: torch.Tensor, finetuned: list[torch.Tensor],
                        stats: Sequence[Statistics]) -> torch.Tensor | None:
        """The merged value of parameter `name` (any floating dtype), or None to average it."""
        return None

    def average(self, base: torch.Tensor, finetuned: list[torch.Tensor]) -> torch.Tensor:
        """`base + sum_i w_i (theta_i - base) / sum_i w_i` in float64."""
        b = base.double()
        coefficients = self.weights / self.weights.sum()
        return b + sum(float(c) * (t.double() - b) for c, t in zip(coefficients, finetuned))

    def merge_model(self, base: Mapping[str, torch.Tensor], finetuned: list[Mapping[str, torch.Tensor]],
                    stats: list[Statistics], *, progress: bool = False) -> dict[str, torch.Tensor]:
        """The merged state dict, on the CPU: the base's keys and dtypes, floating tensors merged, others copied.
        Each parameter is merged where its base tensor is (a GPU's float64 for a `SourceTensors` view on one)
        and comes back before the next one is read."""
        layout = self.check(base, finetuned, stats)
        self.prepare(base, finetuned, stats)
        merged_names = set(layout.names)
        result = {}
        for name in progress_bar(list(base), desc=f"{self.name}: merging", unit="tensor", disable=not progress):
            b = base[name]
            if name not in merged_names:
                result[name] = b.detach().to("cpu", copy=True)
                continue
            thetas = [m[name] for m in finetuned]
            value = self.merge_parameter(name, b, thetas, stats)
            if value is None:
                value = self.average(b, thetas)
            result[name] = value.to(b.dtype).reshape(b.shape).contiguous().cpu()
        return result

    def working_bytes(self, layout: FlatLayout, n: int) -> int:
        """Memory the merge of one parameter holds beyond its output (for predictions): by default n + 3 float64
        copies of the largest tensor."""
        return (n + 3) * 8 * max(shape.numel() for shape in layout.shapes)


class TaskDataMethod(Method):
    """A merge that runs the models itself on the tasks' data, so it cannot use saved statistics (RegMean++,
    whose Grams depend on the blocks merged before them). It needs the model (an `nn.Module`) and one
    `pyfuse.Task` per fine-tuned model; it merges in memory, in one process."""

    kind = "task-data"
    runs_tasks = True

    @classmethod
    def inputs_note(cls) -> str:
        return "[tasks, --trust-code]"

    @classmethod
    def take_inputs(cls, statistics: Any, tasks: Any, model: Any, base: Any) -> tuple[None, Any, torch.nn.Module]:
        if statistics is not None:
            raise ValueError(f"{cls.name!r} runs the models on the tasks' data itself; give tasks=[...], not "
                             "statistics")
        if tasks is None:
            raise ValueError(f"{cls.name!r} needs tasks=[...], one pyfuse.Task per fine-tuned model, and the model: "
                             "an nn.Module base, or model=...")
        if model is None:
            if not isinstance(base, torch.nn.Module):
                raise ValueError(f"{cls.name!r} runs the model: give the base as an nn.Module, or model=... (the "
                                 "architecture, whose values are replaced by the base's)")
            model = base
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"{cls.name!r}: model must be an nn.Module, got {type(model).__name__}")
        return None, tasks, model

    def check_inputs(self, plan: MergePlan) -> None:
        self.check_tasks(plan.tasks, len(plan.models))
        base = plan.base
        for key, value in plan.model.state_dict().items():
            if key not in base.specs:
                raise KeyError(f"{self.name}: the model has a tensor {key!r} that {base.label} lacks")
            if base.shape(key) != value.shape:
                raise ValueError(f"{self.name}: tensor {key!r} has shape {list(base.shape(key))} in "
                                 f"{base.label}, {list(value.shape)} in the model")
        plan.tasks = list(plan.tasks)

    def peak_bytes(self, plan: MergePlan) -> int:
        model_bytes = sum(t.numel() * t.element_size() for t in plan.model.state_dict().values())
        return plan.output_bytes + self.working_bytes(model_bytes)

    def merge_in_memory(self, plan: MergePlan, models: list[Mapping[str, torch.Tensor]],
                        keys: Sequence[str] | None, progress: bool) -> dict[str, torch.Tensor]:
        return self.merge(plan.model, models, plan.tasks, base=SourceTensors(plan.base), progress=progress,
                          device=plan.device)

    def check_tasks(self, tasks: Sequence[Task], n: int) -> None:
        """Raise unless `tasks` is a list of `n` Tasks, one per fine-tuned model, in the same order."""
        if isinstance(tasks, Task) or not isinstance(tasks, Sequence) or len(tasks) != n:
            got = "one Task" if isinstance(tasks, Task) else (
                str(len(tasks)) if isinstance(tasks, Sequence) else type(tasks).__name__)
            raise ValueError(f"{self.name}: needs one Task per fine-tuned model ({n}), got {got}")
        for i, task in enumerate(tasks):
            if not isinstance(task, Task):
                raise TypeError(f"{self.name}: tasks[{i}] is a {type(task).__name__}, not a pyfuse.Task")

    def merge(self, model: torch.nn.Module, finetuned: Sequence[torch.nn.Module | Mapping[str, torch.Tensor]],
              tasks: Sequence[Task], *, base: Mapping[str, torch.Tensor] | None = None,
              progress: bool = False, device: str | torch.device | None = None) -> dict[str, torch.Tensor]:
        """The merged state dict (the model's keys), on the CPU. `model` gives the architecture and, unless `base`
        is given, the pre-trained values; neither it nor the fine-tuned models are modified. The models run
        and the merge computes on `device` (default: where `model` is)."""
        raise NotImplementedError

    def working_bytes(self, model_bytes: int) -> int:
        """Memory the merge holds beyond its output, for predictions (the tasks' activations not included)."""
        return model_bytes

