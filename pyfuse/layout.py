"""`FlatLayout`: one fixed order of a model's mergeable tensors, flattened into one `[D]` buffer."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from .io.sources import TensorSource, open_source


def is_mergeable(dtype: torch.dtype) -> bool:
    """Floating tensors are merged; integer and bool buffers (position ids, masks) are carried as they are."""
    if dtype.is_complex:
        raise TypeError(f"complex tensors ({dtype}) cannot be merged")
    return dtype.is_floating_point


@dataclass(frozen=True)
class FlatLayout:
    """Names, shapes and dtypes of the mergeable tensors, and their segment `offsets` `[S+1]` in the flat buffer.

    Built from a model, the tensors are in name order (as the authors' TIES flattens them): the flat index,
    which keys the Concrete noise, DARE's drops and saved logits, is then the same whether a model comes as
    a module, a state dict or files, whose key orders differ.
    """

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    dtypes: tuple[torch.dtype, ...]
    offsets: torch.Tensor

    @classmethod
    def from_source(cls, source: TensorSource) -> FlatLayout:
        names, shapes, dtypes = [], [], []
        for key in sorted(source.keys()):
            try:
                mergeable = is_mergeable(source.dtype(key))
            except TypeError as err:
                raise TypeError(f"{source.label}: tensor {key!r}: {err}") from None
            if mergeable and source.shape(key).numel() > 0:
                names.append(key)
                shapes.append(source.shape(key))
                dtypes.append(source.dtype(key))
        if not names:
            raise ValueError(f"{source.label}: no floating-point tensors to merge")
        sizes = torch.tensor([0] + [s.numel() for s in shapes], dtype=torch.int64)
        return cls(tuple(names), tuple(shapes), tuple(dtypes), torch.cumsum(sizes, 0))

    @classmethod
    def for_models(cls, base: TensorSource, models: Sequence[TensorSource]) -> FlatLayout:
        """The base's layout, after checking that every model has exactly its tensors (errors name model and key)."""
        layout = cls.from_source(base)
        for source in models:
            layout.check(source)
            extra = [key for key in source.keys() if key not in base.specs]
            if extra:
                raise KeyError(f"{source.label}: tensor {extra[0]!r} is not in the base model ({base.label})")
        return layout

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, torch.Tensor]) -> FlatLayout:
        return cls.from_source(open_source(state_dict))

    @classmethod
    def from_module(cls, module: torch.nn.Module) -> FlatLayout:
        return cls.from_source(open_source(module))

    @property
    def numel(self) -> int:
        """D, the length of the flat buffer."""
        return int(self.offsets[-1])

    @property
    def sizes(self) -> list[int]:
        """The number of elements of every segment."""
        return (self.offsets[1:] - self.offsets[:-1]).tolist()

    def __len__(self) -> int:
        """S, the number of segments (tensors)."""
        return len(self.names)

    def span(self, index: int) -> tuple[int, int]:
        return int(self.offsets[index]), int(self.offsets[index + 1])

    def check(self, source: TensorSource) -> None:
        """Raise, naming the model and the key, unless `source` has every tensor of the layout, same shape, floating."""
        for name, shape in zip(self.names, self.shapes):
            if name not in source.specs:
                raise KeyError(f"{source.label}: missing tensor {name!r}")
            if not source.dtype(name).is_floating_point:
                raise TypeError(f"{source.label}: tensor {name!r} is {source.dtype(name)}, expected a floating dtype")
            if source.shape(name) != shape:
                raise ValueError(
                    f"{source.label}: tensor {name!r} has shape {list(source.shape(name))}, expected {list(shape)}"
                )

    def flatten(self, tensors: Mapping[str, torch.Tensor] | TensorSource, dtype: torch.dtype = torch.float32,
                out: torch.Tensor | None = None) -> torch.Tensor:
        """Copy the tensors into one `[D]` buffer, one at a time."""
        source = open_source(tensors)
        self.check(source)
        if out is None:
            out = torch.empty(self.numel, dtype=dtype)
        for index, name in enumerate(self.names):
            start, end = self.span(index)
            out[start:end].copy_(source.get(name).reshape(-1))
        return out

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named tensors that are zero-copy views of `flat`; gradients flow through them."""
        if flat.dim() != 1 or flat.numel() != self.numel:
            raise ValueError(f"expected a flat buffer of shape [{self.numel}], got {list(flat.shape)}")
        return {
            name: flat[int(start):int(end)].view(shape)
            for name, shape, start, end in zip(self.names, self.shapes, self.offsets[:-1], self.offsets[1:])
        }
