"""`TaskVectors`: a base model and n task vectors (fine-tuned minus base) over one `FlatLayout`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .finite import check_finite
from .io.sources import TensorSource, open_source
from .layout import FlatLayout
from .progress import progress_bar

_STORAGE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass
class TaskVectors:
    """`base` `[D]` (fp32) and `vectors` `[n, D]` (fp32, bf16 or fp16), with their task names.

    Tensors the base holds but that are not merged (integer buffers such as position ids) are kept
    in `carried` and come back unchanged in `state_dict`.
    """

    layout: FlatLayout
    base: torch.Tensor
    vectors: torch.Tensor
    names: list[str]
    carried: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        D, n = self.layout.numel, len(self.names)
        if self.base.shape != (D,):
            raise ValueError(f"base must have shape [{D}], got {list(self.base.shape)}")
        if self.vectors.shape != (n, D):
            raise ValueError(f"vectors must have shape [{n}, {D}], got {list(self.vectors.shape)}")

    @property
    def n(self) -> int:
        return len(self.names)

    @classmethod
    def from_models(
        cls,
        base,
        finetuned: Sequence,
        names: Sequence[str] | None = None,
        dtype: torch.dtype = torch.float32,
        progress: bool = False,
        allow_nonfinite: bool = False,
    ) -> TaskVectors:
        """Build from a base and n fine-tuned models (state dicts, modules or safetensors paths).

        Every model is checked against the base (keys, shapes) before any tensor is read; then tensors
        are read one at a time, so peak memory stays near the size of the final buffers. Floating dtypes
        may differ (a bf16 fine-tune of an fp32 base): differences are taken in fp32. NaN or inf in any
        tensor raises, naming the model and the tensor, unless `allow_nonfinite`.
        """
        if dtype not in _STORAGE_DTYPES:
            raise ValueError(f"task vectors are stored as one of {_STORAGE_DTYPES}, got {dtype}")
        if not finetuned:
            raise ValueError("need at least one fine-tuned model")
        names = list(names) if names is not None else [f"task{i}" for i in range(len(finetuned))]
        if len(names) != len(finetuned) or len(set(names)) != len(names):
            raise ValueError(f"need {len(finetuned)} distinct task names, got {names}")
        base_src = open_source(base, _label(base, "base"))
        sources = [open_source(m, _label(m, f"fine-tuned model {name!r}")) for m, name in zip(finetuned, names)]
        layout = FlatLayout.from_source(base_src)
        for source in sources:
            layout.check(source)
        base_flat = torch.empty(layout.numel, dtype=torch.float32)
        vectors = torch.empty(len(sources), layout.numel, dtype=dtype)
        offsets = layout.offsets.tolist()
        for index, key in enumerate(progress_bar(layout.names, desc="task vectors", disable=not progress)):
            start, end = offsets[index], offsets[index + 1]
            b = base_flat[start:end]
            b.copy_(check_finite(base_src.get(key), f"{base_src.label}: tensor {key!r}", allow_nonfinite).reshape(-1))
            for row, source in enumerate(sources):
                tuned = check_finite(source.get(key), f"{source.label}: tensor {key!r}", allow_nonfinite)
                vectors[row, start:end].copy_(tuned.reshape(-1).float() - b)
        carried = {key: base_src.get(key) for key in base_src.keys() if key not in set(layout.names)}
        return cls(layout, base_flat, vectors, names, carried)

    def state_dict(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """A full state dict: the merged flat parameters as views by name, plus the carried tensors."""
        return {**self.layout.unflatten(flat), **self.carried}

    def task_state_dict(self, index: int) -> dict[str, torch.Tensor]:
        """The fine-tuned model `index` reconstructed (base + its task vector), in fp32."""
        return self.state_dict(self.base + self.vectors[index].float())


def _label(model, default: str) -> str:
    if isinstance(model, TensorSource):
        return model.label
    if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__"):
        return f"{default} ({model})"
    return default
