"""LoRA adapters (as `peft` saves them) turned into task vectors over the base model's own tensor names.

Reading and checking adapters lives in `pyfuse.io.lora` (below both this module and `pyfuse.taskvectors`); the
names it defines are importable from here as before.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..io.lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    LoraAdapter,
    LoraAdapterError,
    as_adapter,
    load_lora_adapter,
    prepare,
    targeted,
)
from ..io.sources import open_source
from ..progress import progress_bar
from ..taskvectors import TaskVectors

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "LoraAdapter", "LoraAdapterError", "load_lora_adapter", "lora_deltas",
           "lora_factored_task_vectors", "lora_task_models", "lora_task_vectors"]


def lora_deltas(adapter, base=None) -> dict[str, torch.Tensor]:
    """Dense fp32 task vectors `{base weight name: scale * B @ A}` of one adapter (path, hub id, PeftModel or
    `LoraAdapter`); checked against `base` (state dict, module or safetensors path) when one is given."""
    adapter = as_adapter(adapter)
    if base is not None:
        adapter.check(open_source(base, "base model"))
    return adapter.deltas()


def lora_task_models(base, adapters: Sequence) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """The base restricted to the tensors any adapter targets, and per adapter the fine-tuned tensors
    `base + delta` in the base's dtype over the same names (zero delta where that adapter does not target a name):
    inputs for `TaskVectors.from_models` or `pyfuse.merge`. Everything is checked before any delta is computed."""
    source, loaded, names = prepare(base, adapters)
    restricted = {name: source.get(name) for name in names}
    finetuned = []
    for adapter in loaded:
        model = dict(restricted)
        for name in adapter.names:
            model[name] = (restricted[name].float() + adapter.delta(name)).to(restricted[name].dtype)
        finetuned.append(model)
    return restricted, finetuned


def lora_task_vectors(base, adapters: Sequence, names: Sequence[str] | None = None,
                      dtype: torch.dtype = torch.float32, progress: bool = False) -> TaskVectors:
    """`TaskVectors` whose layout is exactly the tensors the adapters target, with the exact deltas as vectors.

    Every other tensor of the base rides along in `carried`, so `state_dict(flat)` is the whole model. Deltas are
    computed one tensor at a time into the final buffer, so no dense copy of an adapter is ever held in full.
    `lora_factored_task_vectors` (`TaskVectors.from_lora`) keeps them as factors instead.
    """
    loaded, names, layout, base_flat, carried = targeted(base, adapters, names)
    vectors = torch.zeros(len(loaded), layout.numel, dtype=dtype)
    for index, name in enumerate(progress_bar(layout.names, desc="LoRA task vectors", disable=not progress)):
        start, end = layout.span(index)
        for row, adapter in enumerate(loaded):
            if name in adapter.factors:
                vectors[row, start:end].copy_(adapter.delta(name).reshape(-1))
    return TaskVectors(layout, base_flat, vectors, names, carried)


def lora_factored_task_vectors(base, adapters: Sequence, names: Sequence[str] | None = None,
                               dtype: torch.dtype = torch.float32) -> TaskVectors:
    """`lora_task_vectors` with the task vectors kept as the adapters' factors (`pyfuse.ops.LoraFactors`):
    `TaskVectors.from_lora` (see `pyfuse.io.lora.factored`)."""
    return TaskVectors.from_lora(base, adapters, names=names, dtype=dtype)
