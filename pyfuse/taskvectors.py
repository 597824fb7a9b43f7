"""`TaskVectors`: a base model and n task vectors (fine-tuned minus base) over one `FlatLayout`.

The task vectors are either dense (`[n, D]`) or, built from LoRA adapters by `from_lora`, kept as their low-rank
factors (`pyfuse.ops.LoraFactors`): the fused op merges those without ever forming a dense task vector, so
every method that merges through it (AdaMerging, Concrete TA / AdaMerging, task arithmetic, concrete) takes
either form. Methods that need every entry's magnitude at once refuse factored ones (`require_dense`).

A rank of a distributed adaptive run holds only its shard: the base and task vectors of a contiguous run of
the layout's segments (`shard`, from `pyfuse.distributed.segment_shards`); the layout stays the whole model's.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .distributed import segment_shards
from .finite import check_finite
from .io.lora import factored
from .io.sources import TensorSource, open_source
from .layout import FlatLayout
from .memory import disk_buffer, is_disk_backed
from .ops.factors import LoraFactors
from .ops.profiling import nvtx_range
from .progress import progress_bar

_STORAGE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass
class TaskVectors:
    """`base` `[D]` (fp32) and `vectors` `[n, D]` (fp32, bf16 or fp16, or `LoraFactors`), with their task names.

    Tensors the base holds but that are not merged (integer buffers such as position ids) are kept
    in `carried` and come back unchanged in `state_dict`. With `shard` = (first, last), base and vectors hold
    only the segments [first, last) of the layout: the flat elements `span` = [lo, hi), `[hi - lo]` and
    `[n, hi - lo]`.
    """

    layout: FlatLayout
    base: torch.Tensor
    vectors: torch.Tensor | LoraFactors
    names: list[str]
    carried: dict[str, torch.Tensor] = field(default_factory=dict)
    shard: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        first, last = self.segments
        if not 0 <= first < last <= len(self.layout):
            raise ValueError(f"shard must be segments [first, last) within [0, {len(self.layout)}), got {self.shard}")
        lo, hi = self.span
        D, n = hi - lo, len(self.names)
        if self.base.shape != (D,):
            raise ValueError(f"base must have shape [{D}], got {list(self.base.shape)}")
        if self.vectors.shape != (n, D):
            raise ValueError(f"vectors must have shape [{n}, {D}], got {list(self.vectors.shape)}")

    @property
    def segments(self) -> tuple[int, int]:
        """The segments [first, last) held: all of them unless this is a shard."""
        return self.shard if self.shard is not None else (0, len(self.layout))

    @property
    def span(self) -> tuple[int, int]:
        """The flat elements [lo, hi) held."""
        first, last = self.segments
        return int(self.layout.offsets[first]), int(self.layout.offsets[last])

    def sharded(self, first: int, last: int) -> TaskVectors:
        """Segments [first, last) only, copied (so the whole buffers can be freed); itself if it holds just those."""
        if (first, last) == self.segments:
            return self
        if self.shard is not None:
            raise ValueError(f"these task vectors are the shard of segments {list(self.shard)}, not a whole model: "
                             f"cannot take segments [{first}, {last})")
        if self.factored:
            raise ValueError("factored LoRA task vectors cannot be sharded over ranks: densify them "
                             "(TaskVectors.densified()) or run in one process")
        lo, hi = int(self.layout.offsets[first]), int(self.layout.offsets[last])
        return TaskVectors(self.layout, self.base[lo:hi].clone(), self.vectors[:, lo:hi].clone(), list(self.names),
                           dict(self.carried), (first, last))

    def to(self, device: torch.device | str) -> TaskVectors:
        """The same task vectors with base, vectors (or factors) and carried tensors on `device` (itself when
        they are all there already)."""
        device = torch.device(device)
        tensors = [self.base, *self.carried.values()]
        if all(t.device == device for t in tensors) and self.vectors.device == device:
            return self
        return TaskVectors(self.layout, self.base.to(device), self.vectors.to(device), list(self.names),
                           {key: t.to(device) for key, t in self.carried.items()}, self.shard)

    def on_disk(self, near: str | os.PathLike, *, base: bool = True, vectors: bool = False) -> TaskVectors:
        """The same task vectors with the base and / or the (dense) task vectors copied into disk-backed buffers
        beside `near` (`pyfuse.memory.disk_buffer`): file pages, which the kernel may drop and re-read under
        memory pressure, instead of anonymous memory. Buffers already disk-backed are kept; the in-memory ones
        stay this object's until it is dropped."""
        if vectors and self.factored:
            raise ValueError(f"factored LoRA task vectors are kept as their factors ({self.nbytes:,} bytes): only "
                             "dense task vectors go on disk")
        moved = {}
        for name, wanted in (("base", base), ("vectors", vectors)):
            tensor = getattr(self, name)
            if not wanted or is_disk_backed(tensor):
                continue
            if tensor.device.type != "cpu":
                raise ValueError(f"a disk-backed buffer is a CPU buffer; these task vectors' {name} is on "
                                 f"{tensor.device}")
            moved[name] = disk_buffer(tensor.numel(), tensor.dtype, near).view(tensor.shape).copy_(tensor)
        return dataclasses.replace(self, **moved) if moved else self

    def require_whole(self, what: str) -> None:
        """Raise, naming `what`, if these task vectors are a shard."""
        if self.shard is not None:
            raise ValueError(f"{what} needs the whole task vectors, not the shard of segments {list(self.shard)}")

    @property
    def n(self) -> int:
        return len(self.names)

    @property
    def factored(self) -> bool:
        """True when the task vectors are kept as LoRA factors (`from_lora`)."""
        return isinstance(self.vectors, LoraFactors)

    @property
    def nbytes(self) -> int:
        """Bytes the task vectors occupy (the factors and their tables when factored)."""
        v = self.vectors
        return v.nbytes if isinstance(v, LoraFactors) else v.numel() * v.element_size()

    def require_dense(self, method: str, why: str) -> None:
        """Raise, naming `method` and `why`, if the task vectors are factored."""
        if self.factored:
            raise ValueError(
                f"{method} cannot take factored LoRA task vectors: it {why}, and they hold no dense entries. "
                f"Use TaskVectors.densified() (n x D x 4 bytes = {self.n * self.layout.numel * 4:,}), or a method "
                f"that merges them factored (task_arithmetic, concrete, adamerging, concrete_task_arithmetic, "
                f"concrete_adamerging)"
            )

    def densified(self, dtype: torch.dtype = torch.float32) -> TaskVectors:
        """The same task vectors in dense form `[n, D]` (themselves when already dense)."""
        if not self.factored:
            return self
        return TaskVectors(self.layout, self.base, self.vectors.densify(dtype), list(self.names), dict(self.carried))

    def segment_deltas(self, index: int) -> torch.Tensor:
        """The n task vectors of tensor `index`, fp32 `[n, len]` (formed from the factors when factored)."""
        self.require_whole("segment_deltas")
        if self.factored:
            return self.vectors.segment(index)
        start, end = self.layout.span(index)
        return self.vectors[:, start:end].float()

    @classmethod
    def from_lora(
        cls,
        base,
        adapters: Sequence,
        names: Sequence[str] | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> TaskVectors:
        """Task vectors of LoRA adapters over the tensors they target, kept as their factors.

        `base`: state dict, module or safetensors path; `adapters`: adapter directories (peft's
        `adapter_config.json` + `adapter_model.safetensors`), hub ids, `peft.PeftModel`s or `LoraAdapter`s, each
        with its own rank, targets and scaling (`lora_alpha / r`, or `lora_alpha / sqrt(r)` with rsLoRA). The
        layout is the union of the targeted tensors; every other base tensor rides along in `carried`. The
        factors are stored in `dtype` (their scale stays fp32). `pyfuse.models.lora_task_vectors` builds the
        same task vectors dense.
        """
        layout, base_flat, factors, names, carried = factored(base, adapters, names, dtype)
        return cls(layout, base_flat, factors, names, carried)

    @classmethod
    def from_models(
        cls,
        base,
        finetuned: Sequence,
        names: Sequence[str] | None = None,
        dtype: torch.dtype = torch.float32,
        progress: bool = False,
        allow_nonfinite: bool = False,
        shard_of: tuple[int, int] | None = None,
        device: torch.device | str = "cpu",
        base_dir: str | os.PathLike | None = None,
        vectors_dir: str | os.PathLike | None = None,
    ) -> TaskVectors:
        """Build from a base and n fine-tuned models (state dicts, modules or safetensors paths).

        Every model is checked against the base (keys, shapes) before any tensor is read; then tensors
        are read one at a time, so peak memory stays near the size of the final buffers. Floating dtypes
        may differ (a bf16 fine-tune of an fp32 base): differences are taken in fp32. NaN or inf in any
        tensor raises, naming the model and the tensor, unless `allow_nonfinite`. With `shard_of` = (rank,
        world size), only that rank's segments (`pyfuse.distributed.segment_shards`) are read and held. The
        buffers are allocated on `device` and filled one tensor at a time, so a GPU run never holds them on the
        CPU. With `base_dir` / `vectors_dir` (CPU only), the base / the task vectors are disk-backed buffers there
        (`pyfuse.memory.disk_buffer`).
        """
        if dtype not in _STORAGE_DTYPES:
            raise ValueError(f"task vectors are stored as one of {_STORAGE_DTYPES}, got {dtype}")
        if not finetuned:
            raise ValueError("need at least one fine-tuned model")
        if (base_dir is not None or vectors_dir is not None) and torch.device(device).type != "cpu":
            raise ValueError(f"disk-backed buffers (base_dir, vectors_dir) are CPU buffers, not ones on {device}")
        names = list(names) if names is not None else [f"task{i}" for i in range(len(finetuned))]
        if len(names) != len(finetuned) or len(set(names)) != len(names):
            raise ValueError(f"need {len(finetuned)} distinct task names, got {names}")
        base_src = open_source(base, _label(base, "base"))
        sources = [open_source(m, _label(m, f"fine-tuned model {name!r}")) for m, name in zip(finetuned, names)]
        layout = FlatLayout.from_source(base_src)
        for source in sources:
            layout.check(source)
        first, last = 0, len(layout)
        if shard_of is not None:
            rank, world_size = shard_of
            first, last = segment_shards(layout.sizes, world_size)[rank]
        offsets = layout.offsets.tolist()
        lo, hi = offsets[first], offsets[last]
        base_flat = (torch.empty(hi - lo, dtype=torch.float32, device=device) if base_dir is None
                     else disk_buffer(hi - lo, torch.float32, base_dir))
        vectors = (torch.empty(len(sources), hi - lo, dtype=dtype, device=device) if vectors_dir is None
                   else disk_buffer(len(sources) * (hi - lo), dtype, vectors_dir).view(len(sources), hi - lo))
        for index in progress_bar(range(first, last), desc="task vectors", disable=not progress):
            key, start, end = layout.names[index], offsets[index] - lo, offsets[index + 1] - lo
            with nvtx_range("taskvectors.read"):
                b = base_flat[start:end]
                b.copy_(check_finite(base_src.get(key), f"{base_src.label}: tensor {key!r}", allow_nonfinite)
                        .reshape(-1))
                for row, source in enumerate(sources):
                    tuned = check_finite(source.get(key), f"{source.label}: tensor {key!r}", allow_nonfinite)
                    vectors[row, start:end].copy_(tuned.reshape(-1).to(device=b.device, dtype=torch.float32) - b)
        carried = {key: base_src.get(key).to(device) for key in base_src.keys() if key not in set(layout.names)}
        return cls(layout, base_flat, vectors, names, carried, None if shard_of is None else (first, last))

    def state_dict(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """A full state dict: the merged flat parameters as views by name, plus the carried tensors."""
        return {**self.layout.unflatten(flat), **self.carried}

    def task_state_dict(self, index: int) -> dict[str, torch.Tensor]:
        """The fine-tuned model `index` reconstructed (base + its task vector), in fp32."""
        self.require_whole("task_state_dict")
        if not self.factored:
            return self.state_dict(self.base + self.vectors[index].float())
        flat = self.base.clone()
        for s in range(len(self.layout)):
            start, end = self.layout.span(s)
            flat[start:end] += self.vectors.segment(s)[index]
        return self.state_dict(flat)


def _label(model, default: str) -> str:
    if isinstance(model, TensorSource):
        return model.label
    if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__"):
        return f"{default} ({model})"
    return default
