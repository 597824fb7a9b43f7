"""The engine's planning room: a merge of whole models checked from headers alone (`plan_merge`, `MergePlan`).

One engine serves both: models are read a bounded chunk at a time (memory-mapped for files), the method
merges chunk by chunk in fp32, and the result is either gathered into a state dict (`merge`) or
written straight into sharded safetensors (`merge_to_dir`), so a streamed merge holds a few chunks, a
method's small tables and nothing proportional to the model. `plan_merge` checks everything, and
predicts memory and output size, from the headers alone, before any tensor data is read; what the method
takes and how it checks it is the method's own answer (`Method.take_inputs`, `check_inputs`, `peak_bytes`).

Data-aware methods (`DataMethod`: fisher, regmean, ...) take `statistics=[...]`, one `Statistics` (or
saved file) per fine-tuned model. They are checked the same way before any work, then merge in memory
(reading each input tensor when they get to it) and write through the same sharded writer and report.
Methods that run the models on the tasks' data themselves (`TaskDataMethod`: regmean++) take `tasks=[...]`,
one `pyfuse.Task` per fine-tuned model, and the model (the base as an `nn.Module`, or `model=`); they too
merge in memory, in one process (rank 0 under torchrun), and write the same way.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..device import resolve_device
from ..io.sources import TensorSource, open_source
from ..layout import FlatLayout
from ..memory import rss_anon_bytes
from ..methods import Method, create_method, get_method
from ..stats import Statistics
from ..task import Task
from ..taskvectors import _label
from .read import CHUNK_ELEMENTS
from .write import DEFAULT_SHARD_SIZE, describe_input, gather, jsonable, write_to_dir

__all__ = ["MergePlan", "input_paths", "parse_dtype", "plan_merge"]

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """A floating output dtype from a torch dtype or a name ("bfloat16", "bf16", "float32", ...); None stays None."""
    if dtype is None or dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.lower().removeprefix("torch.") in _DTYPES:
        return _DTYPES[dtype.lower().removeprefix("torch.")]
    raise ValueError(f"unsupported output dtype {dtype!r}; choose one of float32, bfloat16, float16")


@dataclass
class MergePlan:
    """A checked merge: method, inputs, layout and output tensors, known from headers alone."""

    method: Method
    base: TensorSource
    models: list[TensorSource]
    layout: FlatLayout
    outputs: list[tuple[str, torch.Size, torch.dtype]]  # every tensor of the result, in the base's order
    device: torch.device
    chunk_elements: int
    workers: int  # chunks processed at once (threads); 1 runs everything on the calling thread
    inputs: list[Any] = field(repr=False)  # what the caller passed: base first, then the fine-tuned models
    statistics: list[Statistics] | None = None  # data methods: one per fine-tuned model
    tasks: list[Task] | None = field(default=None, repr=False)  # task-data methods: one per fine-tuned model
    model: torch.nn.Module | None = field(default=None, repr=False)  # task-data methods: the architecture
    allow_nonfinite: bool = False  # let NaN/inf through (inputs and output) instead of raising

    @property
    def output_bytes(self) -> int:
        return sum(shape.numel() * torch.empty((), dtype=dtype).element_size() for _, shape, dtype in self.outputs)

    def predicted_peak_bytes(self, baseline: int | None = None) -> int:
        """Anonymous memory the merge will peak at: `baseline` (default: this process now) plus the working set.

        The working set is, per worker, one chunk's deltas and fp32 base and the method's chunk-sized
        temporaries; the merged chunks waiting to be written; the method's tables; all times the slack
        of the allocator, whose per-thread arenas keep freed chunks (1.5, measured with glibc). Not
        included: the result of `state_dict`, which holds the merged model. Each kind of method says what it
        holds (`Method.peak_bytes`): a data method, the merged model and its per-parameter temporaries.
        """
        if baseline is None:
            baseline = rss_anon_bytes() or 0
        return baseline + int(1.5 * self.method.peak_bytes(self))

    def summary(self) -> dict[str, Any]:
        """What will be merged and written, as JSON-ready values (dry runs print it; reports include it)."""
        n = len(self.models)
        statistics = {"statistics": [st.describe() for st in self.statistics]} if self.statistics else {}
        if self.tasks:
            statistics["tasks"] = [task.name for task in self.tasks]
        out_dtypes = sorted({str(dtype).removeprefix("torch.") for name, _, dtype in self.outputs
                             if name in set(self.layout.names)})
        return {
            "method": self.method.name,
            "parameters": jsonable(self.method.parameters),
            "inputs": [describe_input(source, raw, role) for source, raw, role in
                       zip([self.base, *self.models], self.inputs, ["base"] + ["fine-tuned"] * n)],
            "merged_tensors": len(self.layout),
            "merged_parameters": self.layout.numel,
            "carried_tensors": len(self.outputs) - len(self.layout),
            "output_dtype": out_dtypes[0] if len(out_dtypes) == 1 else out_dtypes,
            "output_bytes": self.output_bytes,
            "device": str(self.device),
            "chunk_elements": self.chunk_elements,
            "threads": self.workers,
            "global_passes": self.method.global_passes(),
            "tensor_passes": self.method.tensor_passes(),
            "predicted_peak_rss_anon_bytes": self.predicted_peak_bytes(),
            "dtype_upcasts": self.dtype_upcasts(),
            **statistics,
        }

    def dtype_upcasts(self) -> list[str]:
        """Fine-tuned models whose floating dtypes differ from the base's. Every input is read into fp32 and
        merged in fp32, so such models merge exactly; reports say which ones did."""
        notes = []
        for model in self.models:
            differ = [(name, model.dtype(name)) for name, dtype in zip(self.layout.names, self.layout.dtypes)
                      if model.dtype(name) != dtype]
            if differ:
                found = sorted({str(dtype).removeprefix("torch.") for _, dtype in differ})
                base = sorted({str(self.base.dtype(name)).removeprefix("torch.") for name, _ in differ})
                notes.append(f"{model.label}: {len(differ)} tensor(s) are {'/'.join(found)} where the base's are "
                             f"{'/'.join(base)} (first {differ[0][0]!r}); both read into float32 and merged in "
                             f"float32")
        return notes

    def input_paths(self) -> list[Path]:
        """Every file or directory the merge reads: models, statistics files, path parameters (mask logits)."""
        return input_paths([*self.inputs, *(st.path for st in self.statistics or ())], self.method)

    def state_dict(self, progress: bool = False) -> dict[str, torch.Tensor]:
        """Run the merge and return the result in memory (CPU tensors, shaped as the base's)."""
        return gather(self, progress)

    def write(self, out_dir: str | os.PathLike, *, force: bool = False, shard_size: int | str = DEFAULT_SHARD_SIZE,
              hash_inputs: bool = True, progress: bool = False,
              other_inputs: Sequence[str | os.PathLike] = ()) -> dict[str, Any]:
        """Run the merge streaming into `out_dir`; returns the report (`pyfuse.engine.write.write_to_dir`)."""
        return write_to_dir(self, out_dir, force=force, shard_size=shard_size, hash_inputs=hash_inputs,
                            progress=progress, other_inputs=other_inputs)


def plan_merge(method: str | Method, base, finetuned: Sequence, *, dtype: str | torch.dtype | None = None,
               device: str | torch.device = "cpu", threads: int | None = None,
               chunk_elements: int = CHUNK_ELEMENTS, statistics: Sequence[Statistics | str | os.PathLike] | None = None,
               tasks: Sequence[Task] | None = None, model: torch.nn.Module | None = None,
               allow_nonfinite: bool = False, **params: Any) -> MergePlan:
    """Check a merge completely, from headers only: parameters, keys, shapes, dtypes. Nothing is read or merged.

    `method` is a registered name with its parameters in `params`, or a method instance (e.g. a checked config's).

    `threads` is how many chunks are merged at once (default: torch's CPU threads; 1 on CUDA); a data
    method uses as many torch threads. `statistics`: for data methods only, one `Statistics` or saved
    statistics file per fine-tuned model. `tasks`, `model`: for task-data methods only (regmean++), one
    `pyfuse.Task` per fine-tuned model and the architecture (default: `base`, when it is an `nn.Module`), whose
    values are replaced by the base's. Errors name the model and the key (or the method and the
    parameter, or the statistics, kind and key). When merging, NaN or inf in an input or the result
    raises (naming model or method, tensor and count) unless `allow_nonfinite=True`.
    """
    if isinstance(method, Method):  # a configured instance (a config's), its parameters already checked
        if params:
            raise ValueError(f"{method.name}: parameters {', '.join(map(repr, params))} given beside a configured "
                             "method; give them to the method")
        cls, instance = type(method), method
    else:
        cls, instance = get_method(method), None
    statistics, tasks, model = cls.take_inputs(statistics, tasks, model, base)
    if instance is None:
        instance = create_method(method, **params)
    out_dtype = parse_dtype(dtype)
    device = resolve_device(device)
    if isinstance(finetuned, (str, os.PathLike, Mapping)) or not isinstance(finetuned, Sequence) or not finetuned:
        raise ValueError("finetuned must be a non-empty list of models (state dicts, modules or paths)")
    if chunk_elements < 1:
        raise ValueError(f"chunk_elements must be positive, got {chunk_elements}")
    if threads is None:
        threads = 1 if device.type == "cuda" else torch.get_num_threads()
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a positive integer, got {threads!r}")
    base_source = open_source(base, _label(base, "base"))
    models = [open_source(m, _label(m, f"fine-tuned model {i + 1}")) for i, m in enumerate(finetuned)]
    layout = FlatLayout.for_models(base_source, models)
    plan = MergePlan(instance, base_source, models, layout, [], device, chunk_elements, threads,
                     [base, *finetuned], statistics, tasks, model, allow_nonfinite)
    instance.check_inputs(plan)
    merged = set(layout.names)
    plan.outputs = [(key, base_source.shape(key),
                     (out_dtype or base_source.dtype(key)) if key in merged else base_source.dtype(key))
                    for key in base_source.keys()]
    return plan


def input_paths(sources: Iterable[Any], method: Method | None = None) -> list[Path]:
    """The paths among `sources` (models, statistics: paths, tensors, modules or None) and `method`'s path
    parameters (mask logits): what a merge reads, which its output directory may not hold."""
    paths = [raw for raw in sources if isinstance(raw, (str, os.PathLike))]
    if method is not None:
        declared = method.params
        paths += [value for key, value in method.parameters.items()
                  if key in declared and declared[key].path and isinstance(value, (str, os.PathLike))]
    return [Path(p) for p in paths]
