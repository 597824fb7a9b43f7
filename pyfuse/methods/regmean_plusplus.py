"""RegMean++ (fusion_bench's `RegMeanAlgorithmPlusPlus`): RegMean whose Grams see the merged model's own
representations, merged block by block.

The model's sequential blocks (the layers of an `nn.ModuleList`, `blocks`) are merged in order. Before the
first, every parameter of the modules that run before it (embeddings, a pre-LayerNorm) takes the mean of the
fine-tuned models, and each task's inputs to the first block are computed by that merged model on the task's
first batches (whole batches until `num_regmean_examples` examples). Then, for block `l`:

1. each task's Grams `X^T X / rows` of the inputs of every Linear in block `l` are taken by running the task's
   *fine-tuned* block `l` on the task's current inputs (all rows: tokens are not masked, as the reference);
2. block `l` is merged: Linear weights by RegMean's closed form (`pyfuse.methods.regmean.regression_mean`,
   equal coefficients, off-diagonal Gram entries scaled by `alpha`), every other entry of its state (biases,
   norms) by the mean of the fine-tuned models; entries matching `exclude_param_names_regex` (`re.match` on
   the name inside the block) keep the base's values;
3. each task's inputs to block `l + 1` are the merged block `l`'s outputs on its inputs to block `l`.

Parameters outside the blocks that run after them (a final norm, projections, heads) keep the base's values,
as in the reference, whose CLIP version loads only the merged embeddings and layers into the pre-trained model.

It needs the models and the tasks' data (a `TaskDataMethod`): `RegMeanPlusPlus.merge(model, finetuned, tasks)`,
where `model` is the base model as a module (not modified) and `tasks` are `pyfuse.Task`s, one per fine-tuned
model, whose `logits(call, batch)` runs the model on a batch; or `pyfuse.merge("regmean++", base, finetuned,
tasks=[...])` (and `merge_to_dir`, `pyfuse merge` configs with `tasks`). Grams are accumulated in float64;
the forward passes run in the model's dtype. With `device` ("cuda"), the working copy of the model, the tasks'
batches, each block's fine-tuned tensors (read when the block is reached), the Grams and the solves are there;
the merged state dict comes back to the CPU.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..device import resolve_device, tasks_on_device
from ..io.sources import TensorSource
from ..progress import progress_bar
from ..stats import _linear_layers
from ..task import Task
from .base import Param, integer, number, register
from .data_aware import TaskDataMethod, as_source
from .regmean import regression_mean


class _Reached(Exception):
    """Raised by a pre-hook to stop a forward pass at the first block, once its inputs are captured."""


def _regexes(value: Any) -> tuple[str, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise TypeError(f"must be a list of regular expressions, got {value!r}")
    for pattern in value:
        try:
            re.compile(pattern)
        except (re.error, TypeError) as err:
            raise ValueError(f"has an invalid regular expression {pattern!r}: {err}") from None
    return tuple(value)


def _module_path(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise TypeError(f"must be the dotted name of an nn.ModuleList, got {value!r}")
    return value


def find_blocks(model: torch.nn.Module, name: str | None) -> tuple[str, torch.nn.ModuleList]:
    """The model's sequential blocks: the `nn.ModuleList` named `name`, or else the longest one in the model."""
    lists = {key: module for key, module in model.named_modules() if isinstance(module, torch.nn.ModuleList)}
    if name is not None:
        if name not in lists:
            raise ValueError(f"regmean++: blocks {name!r} is not an nn.ModuleList of the model; its ModuleLists: "
                             f"{', '.join(lists) or 'none'}")
        return name, lists[name]
    if not lists:
        raise ValueError("regmean++: the model has no nn.ModuleList of blocks to merge in sequence")
    key = max(lists, key=lambda k: len(lists[k]))
    return key, lists[key]


@register
class RegMeanPlusPlus(TaskDataMethod):
    """RegMean++: block-by-block RegMean with Grams on the merged earlier blocks' outputs (module docstring)."""

    name = "regmean++"
    display_name = "RegMean++"
    reference = "fusion_bench's RegMeanAlgorithmPlusPlus (Nguyen et al., 2025, RegMean++)"
    summary = "RegMean block by block, Grams on the merged earlier blocks' outputs (needs the models and data)"
    params = {
        "alpha": Param(0.95, number(0, 1), "scale of the Grams' off-diagonal entries (fusion_bench's "
                                           "reduce_non_diagonal_ratio)"),
        "num_regmean_examples": Param(256, integer(1, 2**31), "examples per task (whole batches, until reached)"),
        "exclude_param_names_regex": Param((), _regexes, "block entries kept at the base's values (re.match on "
                                                         "the name inside the block)"),
        "blocks": Param(None, _module_path, "dotted name of the nn.ModuleList merged in sequence "
                                            "(default: the model's longest)"),
    }

    def merge(self, model: torch.nn.Module, finetuned: Sequence[torch.nn.Module | Mapping[str, torch.Tensor]],
              tasks: Sequence[Task], *, base: Mapping[str, torch.Tensor] | None = None,
              progress: bool = False, device: str | torch.device | None = None) -> dict[str, torch.Tensor]:
        """The merged state dict (the model's keys), on the CPU; `model` and the fine-tuned models are not
        modified. The merge computes on `device` (default: where the model is)."""
        if isinstance(finetuned, (Mapping, torch.nn.Module)) or not finetuned:
            raise ValueError("regmean++: finetuned must be a non-empty list of modules or state dicts")
        self.check_tasks(tasks, len(finetuned))
        work = copy.deepcopy(model).eval()
        if base is not None:  # the pre-trained values replace the architecture's own
            with torch.no_grad():
                for key, value in work.state_dict(keep_vars=True).items():
                    if key not in base:
                        raise KeyError(f"regmean++: the base has no tensor {key!r}, which the model has")
                    if base[key].shape != value.shape:
                        raise ValueError(f"regmean++: the base's tensor {key!r} has shape {list(base[key].shape)}, "
                                         f"the model's {list(value.shape)}")
                    value.data.copy_(base[key])
        if device is not None:
            work.to(resolve_device(device))
            tasks = tasks_on_device(tasks, resolve_device(device))
        on = next(iter(work.state_dict().values())).device
        base = work.state_dict()
        # lazy sources: shapes from headers, and a block reads only its own tensors when it gets to them
        states = [as_source(m, f"fine-tuned model {i + 1}") for i, m in enumerate(finetuned)]
        for i, state in enumerate(states):
            for key, value in base.items():
                if key not in state.specs:
                    raise KeyError(f"regmean++: fine-tuned model {i + 1}: missing tensor {key!r}")
                if state.shape(key) != value.shape:
                    raise ValueError(f"regmean++: fine-tuned model {i + 1}: tensor {key!r} has shape "
                                     f"{list(state.shape(key))}, expected {list(value.shape)}")
        prefix, blocks = find_blocks(work, self.parameters["blocks"])
        with torch.no_grad():
            self._merge_before(work, blocks[0], states, tasks[0])
            inputs = [self._first_inputs(work, blocks[0], task) for task in tasks]
            for index, block in enumerate(progress_bar(blocks, desc="regmean++: blocks", disable=not progress)):
                names = f"{prefix}.{index}."
                block_states = [{key[len(names):]: state.get(key).to(on) for key in state.keys()
                                 if key.startswith(names)} for state in states]
                grams = [self._grams(block, own, batches) for own, batches in zip(block_states, inputs)]
                self._merge_block(block, block_states, grams)
                if index + 1 < len(blocks):
                    inputs = [[_next_inputs(block, args, kwargs) for args, kwargs in batches] for batches in inputs]
        return {key: value.detach().to("cpu", copy=True) for key, value in work.state_dict().items()}

    def _merge_before(self, work: torch.nn.Module, first: torch.nn.Module, states: list[TensorSource],
                      task: Task) -> None:
        """Average the parameters of the modules that finish before the first block starts (one batch's pass)."""
        finished: list[str] = []
        names = {module: key for key, module in work.named_modules()}
        handles = [module.register_forward_hook(lambda m, i, o: finished.append(names[m]))
                   for module in work.modules() if module is not work]
        handles.append(first.register_forward_pre_hook(_stop))
        try:
            _run_until_first_block(work, task, next(iter(task.batches)))
        finally:
            for handle in handles:
                handle.remove()
        for module_name in finished:
            module = work.get_submodule(module_name)
            for key, value in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
                # a non-persistent buffer (e.g. Llama's rotary `inv_freq`) is computed, not in any checkpoint
                if value.is_floating_point() and key not in module._non_persistent_buffers_set:  # noqa: SLF001
                    full = f"{module_name}.{key}"
                    value.copy_(torch.stack([state.get(full).to(value) for state in states]).mean(0))

    def _first_inputs(self, work: torch.nn.Module, first: torch.nn.Module, task: Task) -> list[tuple[tuple, dict]]:
        """(args, kwargs) of the first block on the task's batches, until `num_regmean_examples` examples."""
        captured: list[tuple[tuple, dict]] = []

        def capture(module, args, kwargs):
            captured.append((args, kwargs))
            raise _Reached

        handle = first.register_forward_pre_hook(capture, with_kwargs=True)
        examples = 0
        try:
            for batch in task.batches:
                if examples >= self.parameters["num_regmean_examples"]:
                    break
                _run_until_first_block(work, task, batch)
                examples += captured[-1][0][0].shape[0] if captured[-1][0] else _first_tensor(captured[-1][1])
        finally:
            handle.remove()
        if not captured:
            raise ValueError(f"regmean++: task {task.name!r} has no batches")
        return captured

    def _grams(self, block: torch.nn.Module, own: Mapping[str, torch.Tensor],
               batches: list[tuple[tuple, dict]]) -> dict[str, torch.Tensor]:
        """Per Linear weight of the block, the Gram of its inputs with the task's own block on `batches`."""
        layers = _linear_layers(block)
        sums: dict[str, list] = {layer.key: [0.0, 0] for layer in layers}

        def observe(key: str):
            def hook(module, args, output):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
                sums[key][0] = sums[key][0] + x.T @ x
                sums[key][1] += x.shape[0]
            return hook

        handles = [layer.module.register_forward_hook(observe(layer.key)) for layer in layers]
        try:
            for args, kwargs in batches:
                torch.func.functional_call(block, dict(own), args, kwargs)
        finally:
            for handle in handles:
                handle.remove()
        return {key: total / rows for key, (total, rows) in sums.items() if rows}

    def _merge_block(self, block: torch.nn.Module, states: list[Mapping[str, torch.Tensor]],
                     grams: list[dict[str, torch.Tensor]]) -> None:
        transposed = {layer.key: layer.transposed for layer in _linear_layers(block)}
        excluded = self.parameters["exclude_param_names_regex"]
        coefficients = [1 / len(states)] * len(states)
        for key, value in block.state_dict(keep_vars=True).items():
            if not value.is_floating_point() or any(re.match(pattern, key) for pattern in excluded):
                continue
            values = [state[key] for state in states]
            if key in transposed and key in grams[0]:
                merged = regression_mean(values, (g[key] for g in grams), coefficients, self.parameters["alpha"],
                                         transposed[key])
            else:
                merged = torch.stack([v.double() for v in values]).mean(0)
            value.data.copy_(merged.to(value.dtype))


def _stop(module, args) -> None:
    raise _Reached


def _run_until_first_block(work: torch.nn.Module, task: Task, batch: Any) -> None:
    try:
        task.logits(work, batch)
    except _Reached:
        return
    raise ValueError(f"regmean++: task {task.name!r}: its logits never ran the first block")


def _first_tensor(kwargs: Mapping[str, Any]) -> int:
    """Rows of the first tensor among a block's keyword arguments (hidden states passed by name)."""
    for value in kwargs.values():
        if isinstance(value, torch.Tensor):
            return value.shape[0]
    raise ValueError("regmean++: the first block received no tensor")


def _next_inputs(block: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The merged block's outputs as the next block's hidden states, with the same other arguments."""
    out = block(*args, **kwargs)
    hidden = out[0] if isinstance(out, (tuple, list)) else out
    if args:
        return (hidden, *args[1:]), kwargs
    key = next(k for k, v in kwargs.items() if isinstance(v, torch.Tensor))
    return args, {**kwargs, key: hidden}
