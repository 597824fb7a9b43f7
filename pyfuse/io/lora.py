"""LoRA adapters (as `peft` saves them): read, checked against the base, and their factors over the base model's
own tensor names (`factored`); `pyfuse.models.lora` turns them into `TaskVectors`, dense or factored.

A LoRA adapter fine-tunes a weight `W` [out, in] as `W + scale * B @ A`, with `A` [r, in], `B` [out, r] and
`scale = lora_alpha / r` (`lora_alpha / sqrt(r)` with `use_rslora`). Its task vector is that dense delta,
keyed by the base's name of `W`: peft's `base_model.model.<path>.lora_A.weight` belongs to `<path>.weight`.
Only the targeted tensors get one, so a `TaskVectors` over them is a small fraction of the model.

Adapter variants whose effect is not one such delta per weight (DoRA, trained biases, embedding or convolution
LoRA, per-module rank or alpha patterns, extra trained modules, initialisations that rewrite the base weights)
are refused with an error naming the feature, rather than silently merged wrong.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..layout import FlatLayout
from ..ops.factors import LoraFactors
from .hub import resolve_model_dir
from .sources import TensorSource, open_source

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."

# Config fields that change what the adapter computes; each must be unset (None, False, empty) to be merged.
_UNSUPPORTED = {
    "use_dora": "DoRA (weight-decomposed LoRA rescales every column of W, not a low-rank delta)",
    "lora_bias": "LoRA biases (lora_bias=True)",
    "rank_pattern": "per-module ranks (rank_pattern)",
    "alpha_pattern": "per-module alphas (alpha_pattern)",
    "modules_to_save": "fully trained extra modules (modules_to_save)",
    "trainable_token_indices": "trainable token embeddings (trainable_token_indices)",
    "layer_replication": "layer replication",
    "target_parameters": "LoRA on raw parameters (target_parameters)",
    "alora_invocation_tokens": "activated LoRA (applies only after invocation tokens)",
    "arrow_config": "Arrow routing over several LoRAs",
    "use_qalora": "QA-LoRA (quantisation-aware pooling of the input)",
    "megatron_config": "Megatron-parallel LoRA layers",
    "use_bdlora": "block-diagonal LoRA factors (BD-LoRA)",
    "kasa_config": "KaSA (a learned singular-value diagonal between A and B)",
    "monteclora_config": "MonteCLoRA (sampled LoRA factors)",
}
# Initialisations that rewrite the base weights, so the saved factors are not a delta from the original base.
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


class LoraAdapterError(ValueError):
    """An adapter that cannot be turned into dense task vectors: an unsupported feature or a mismatch."""


@dataclass(frozen=True)
class LoraAdapter:
    """One LoRA adapter's low-rank factors, keyed by the base weight they update.

    Attributes:
        label: where it came from, for error messages.
        factors: base weight name -> `(A [r, in], B [out, r])`.
        rank: r.
        scale: `lora_alpha / r`, or `lora_alpha / sqrt(r)` with rsLoRA.
        fan_in_fan_out: the base weights are stored `[in, out]` (GPT-2's Conv1D), so the delta is transposed.
    """

    label: str
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    rank: int
    scale: float
    fan_in_fan_out: bool = False

    @property
    def names(self) -> list[str]:
        """The base weights this adapter updates, sorted."""
        return sorted(self.factors)

    def delta_shape(self, name: str) -> torch.Size:
        lora_a, lora_b = self.factors[name]
        shape = (lora_b.shape[0], lora_a.shape[1])
        return torch.Size(shape[::-1] if self.fan_in_fan_out else shape)

    def delta(self, name: str) -> torch.Tensor:
        """The dense fp32 update `scale * B @ A` of base weight `name` (transposed with `fan_in_fan_out`)."""
        lora_a, lora_b = self.factors[name]
        delta = (lora_b.float() @ lora_a.float()) * self.scale
        return delta.T.contiguous() if self.fan_in_fan_out else delta

    def deltas(self) -> dict[str, torch.Tensor]:
        """Every targeted base weight's dense fp32 update."""
        return {name: self.delta(name) for name in self.names}

    def check(self, base: TensorSource) -> None:
        """Raise, naming the key and shapes, unless every targeted weight exists in `base` with the delta's shape."""
        for name in self.names:
            if name not in base.specs:
                raise LoraAdapterError(
                    f"{self.label}: targets {name!r}, which the base model ({base.label}) does not have; "
                    f"is the adapter for another architecture?"
                )
            if base.shape(name) != self.delta_shape(name):
                lora_a, lora_b = self.factors[name]
                raise LoraAdapterError(
                    f"{self.label}: {name!r}: lora_B {list(lora_b.shape)} @ lora_A {list(lora_a.shape)} gives "
                    f"{list(self.delta_shape(name))}, but the base weight is {list(base.shape(name))}"
                )
            if not base.dtype(name).is_floating_point:
                raise LoraAdapterError(f"{self.label}: {name!r} is {base.dtype(name)} in the base, not floating")


def load_lora_adapter(adapter, *, adapter_name: str = "default", label: str | None = None) -> LoraAdapter:
    """Read a LoRA adapter: a directory (or hub id) with `adapter_config.json` and `adapter_model.safetensors`,
    or a loaded `peft.PeftModel` (its adapter `adapter_name`). Unsupported features raise `LoraAdapterError`."""
    if isinstance(adapter, (str, os.PathLike)):
        directory = resolve_model_dir(adapter, required=(ADAPTER_CONFIG,), any_of=(ADAPTER_WEIGHTS,),
                                      what="LoRA adapter")
        label = label or f"LoRA adapter {str(adapter)!r}"
        config = _read_config(directory / ADAPTER_CONFIG, label)
        from safetensors.torch import load_file

        tensors = load_file(str(directory / ADAPTER_WEIGHTS))
        return _from_parts(config, tensors, label)
    try:
        from peft import PeftModel, get_peft_model_state_dict
    except ImportError:  # pragma: no cover - only reached with a non-path argument
        PeftModel = None
    if PeftModel is None or not isinstance(adapter, PeftModel):
        raise TypeError(f"expected an adapter directory, hub id or peft.PeftModel, got {type(adapter).__name__}")
    if adapter_name not in adapter.peft_config:
        raise LoraAdapterError(f"the peft model has no adapter {adapter_name!r} (it has {list(adapter.peft_config)})")
    label = label or f"LoRA adapter {adapter_name!r} of a {type(adapter).__name__}"
    config = adapter.peft_config[adapter_name].to_dict()
    tensors = get_peft_model_state_dict(adapter, adapter_name=adapter_name)
    return _from_parts(config, {k: v.detach() for k, v in tensors.items()}, label)


def factored(base, adapters: Sequence, names: Sequence[str] | None = None, dtype: torch.dtype = torch.float32
             ) -> tuple[FlatLayout, torch.Tensor, LoraFactors, list[str], dict[str, torch.Tensor]]:
    """The adapters' task vectors kept as their factors: the layout of the targeted tensors, the base over it
    (fp32 `[D]`), the `LoraFactors`, the task names and every other base tensor (carried).

    Tensor `W` [out, in] gets from each adapter targeting it the term `scale * B @ A` (`A^T`, `B^T` swapped in
    for weights stored transposed, `fan_in_fan_out`); ranks and scales may differ between adapters.
    """
    loaded, names, layout, base_flat, carried = targeted(base, adapters, names)
    rows, terms = [], []
    for name, shape in zip(layout.names, layout.shapes):
        rows.append(shape[0])
        seg = []
        for task, adapter in enumerate(loaded):
            if name in adapter.factors:
                lora_a, lora_b = adapter.factors[name]
                left, right = (lora_a.T, lora_b.T) if adapter.fan_in_fan_out else (lora_b, lora_a)
                seg.append((task, left, right, adapter.scale))
        terms.append(seg)
    factors = LoraFactors.from_segments(layout.offsets, rows, terms, len(loaded), dtype)
    return layout, base_flat, factors, names, carried


def targeted(base, adapters: Sequence, names: Sequence[str] | None):
    """The checked adapters, task names, the layout of the targeted tensors, the base over it (fp32 [D]) and
    every other base tensor (carried)."""
    source, loaded, targeted = prepare(base, adapters)
    names = list(names) if names is not None else [f"task{i}" for i in range(len(loaded))]
    if len(names) != len(loaded) or len(set(names)) != len(names):
        raise ValueError(f"need {len(loaded)} distinct task names, got {names}")
    restricted = {name: source.get(name) for name in targeted}
    layout = FlatLayout.from_state_dict(restricted)
    carried, tied = {}, {}
    for key in source.keys():
        if key not in restricted:
            tensor = source.get(key)
            # Tied weights (T5's shared embeddings) stay one tensor object: functional_call refuses distinct
            # values for names the module ties, even when they are equal views.
            carried[key] = tied.setdefault((tensor.data_ptr(), tensor.shape, tensor.stride(), tensor.dtype), tensor)
    return loaded, names, layout, layout.flatten(restricted), carried


def prepare(base, adapters: Sequence) -> tuple[TensorSource, list[LoraAdapter], list[str]]:
    if not adapters:
        raise ValueError("need at least one LoRA adapter")
    source = open_source(base, "base model")
    loaded = [as_adapter(adapter) for adapter in adapters]
    for adapter in loaded:
        adapter.check(source)
    return source, loaded, sorted(set().union(*(adapter.factors for adapter in loaded)))


def as_adapter(adapter) -> LoraAdapter:
    return adapter if isinstance(adapter, LoraAdapter) else load_lora_adapter(adapter)


def _read_config(path: Path, label: str) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise LoraAdapterError(f"{label}: {path} is not valid JSON ({err})") from None


def _from_parts(config: Mapping, tensors: Mapping[str, torch.Tensor], label: str) -> LoraAdapter:
    """Validate an adapter's config and tensors (peft's saved key format) and pair its factors by base weight."""
    peft_type = str(config.get("peft_type", "")).upper().split(".")[-1]
    if peft_type != "LORA":
        raise LoraAdapterError(f"{label}: peft_type is {config.get('peft_type')!r}; only LoRA adapters are supported")
    for key, feature in _UNSUPPORTED.items():
        if config.get(key):
            raise LoraAdapterError(f"{label}: uses {feature}, which cannot be merged as a dense LoRA delta")
    if config.get("bias", "none") != "none":
        raise LoraAdapterError(f"{label}: trains biases (bias={config['bias']!r}); only bias='none' is supported")
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
        raise LoraAdapterError(
            f"{label}: init_lora_weights={init!r} rewrites the base weights, so its factors are not a delta from "
            f"the original base; convert it to plain LoRA first (peft's path_initial_model_for_weight_conversion)"
        )
    rank, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(rank, int) or rank <= 0 or not isinstance(alpha, (int, float)):
        raise LoraAdapterError(f"{label}: needs a positive integer r and a numeric lora_alpha, got r={rank!r}, "
                               f"lora_alpha={alpha!r}")
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank

    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        path = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
        if ".lora_embedding_" in path:
            raise LoraAdapterError(f"{label}: {key!r} is embedding LoRA, which is not supported")
        if ".lora_magnitude_vector" in path:
            raise LoraAdapterError(f"{label}: {key!r} is a DoRA magnitude, which is not supported")
        module, _, factor = path.rpartition(".lora_")
        if factor not in ("A.weight", "B.weight"):
            raise LoraAdapterError(
                f"{label}: unexpected tensor {key!r} (expected only '<module>.lora_A.weight' and "
                f"'<module>.lora_B.weight'; biases, extra modules or adapter variants are not supported)"
            )
        if tensor.dim() != 2:
            raise LoraAdapterError(f"{label}: {key!r} has shape {list(tensor.shape)}; only LoRA on linear layers "
                                   f"(2-D factors) is supported, not on convolutions")
        pairs.setdefault(f"{module}.weight", {})[factor[0]] = tensor
    if not pairs:
        raise LoraAdapterError(f"{label}: holds no LoRA tensors")

    factors = {}
    for name, pair in sorted(pairs.items()):
        missing = [f"lora_{f}" for f in "AB" if f not in pair]
        if missing:
            raise LoraAdapterError(f"{label}: the module of {name!r} has no {missing[0]} tensor")
        lora_a, lora_b = pair["A"], pair["B"]
        if lora_a.shape[0] != rank or lora_b.shape[1] != rank:
            raise LoraAdapterError(
                f"{label}: {name!r}: lora_A {list(lora_a.shape)} and lora_B {list(lora_b.shape)} do not have "
                f"rank r={rank} from the config (lora_A must be [r, in], lora_B [out, r])"
            )
        factors[name] = (lora_a, lora_b)
    return LoraAdapter(label, factors, rank, float(scale), bool(config.get("fan_in_fan_out", False)))
