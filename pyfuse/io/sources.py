"""A uniform, lazy view of a model's tensors, whatever holds them.

`open_source` accepts a state dict, an `nn.Module`, a `.safetensors` file, or a directory holding
`model.safetensors` or a sharded `model.safetensors.index.json`. Shapes and dtypes come from headers,
so inputs can be checked before any tensor data is read; `get` reads one tensor (memory-mapped for files).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .identity import FileStamp

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


class TensorSource:
    """Names, shapes and dtypes of a model's tensors, and the tensors themselves on demand."""

    def __init__(self, label: str, specs: dict[str, tuple[torch.Size, torch.dtype]], reader,
                 stamps: Sequence[FileStamp] = ()):
        self.label = label
        self.specs = specs
        self._reader = reader
        self.stamps = list(stamps)  # of the files, as their headers were read
        self.bytes_read = 0  # of the tensors `get` returned, in their stored dtypes (for reports)

    def check_unchanged(self) -> None:
        """Raise `InputChanged`, naming the file, if one of the source's files changed since it was opened."""
        for stamp in self.stamps:
            stamp.check()

    def keys(self) -> list[str]:
        return list(self.specs)

    def shape(self, key: str) -> torch.Size:
        return self.specs[key][0]

    def dtype(self, key: str) -> torch.dtype:
        return self.specs[key][1]

    def get(self, key: str) -> torch.Tensor:
        if key not in self.specs:
            raise KeyError(f"{self.label}: no tensor named {key!r}")
        tensor = self._reader(key)
        self.bytes_read += tensor.numel() * tensor.element_size()
        return tensor


def _from_mapping(tensors: Mapping[str, torch.Tensor], label: str) -> TensorSource:
    specs = {}
    for key, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{label}: entry {key!r} is a {type(value).__name__}, not a tensor")
        specs[key] = (value.shape, value.dtype)
    return TensorSource(label, specs, lambda key: tensors[key].detach())


def _safetensors_header(path: Path) -> dict[str, dict]:
    """The tensor entries of a safetensors file's header, each checked against the file's size.

    Errors name the file and the entry: a truncated file or offsets past its end fail here, not at the read.
    """
    file_size = os.path.getsize(path)
    with open(path, "rb") as f:
        size_bytes = f.read(8)
        if len(size_bytes) != 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than its 8-byte header size)")
        size = int.from_bytes(size_bytes, "little")
        if size > file_size - 8:
            raise ValueError(f"{path}: not a safetensors file (header size {size} exceeds the file)")
        try:
            header = json.loads(f.read(size))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{path}: not a safetensors file ({err})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: malformed safetensors header (a JSON {type(header).__name__}, not an object)")
    header.pop("__metadata__", None)
    data_size = file_size - 8 - size
    for key, info in header.items():
        _check_entry(path, key, info, data_size)
    return header


def _check_entry(path: Path, key: str, info: Any, data_size: int) -> None:
    where = f"{path}: tensor {key!r}"
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
        raise ValueError(f"{where}: malformed header entry (needs dtype, shape and data_offsets), got {info!r:.100}")
    dtype = _SAFETENSORS_DTYPES.get(info["dtype"]) if isinstance(info["dtype"], str) else None
    shape, offsets = info["shape"], info["data_offsets"]
    if dtype is None:
        raise TypeError(f"{where} has unsupported dtype {info['dtype']!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        raise ValueError(f"{where}: shape must be a list of non-negative integers, got {shape!r:.100}")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
        raise ValueError(f"{where}: data_offsets must be [begin, end] integers, got {offsets!r:.100}")
    begin, end = offsets
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if not 0 <= begin <= end or end - begin != nbytes:
        raise ValueError(f"{where}: data_offsets {offsets} do not hold {nbytes} bytes of {info['dtype']} {shape}")
    if end > data_size:
        raise ValueError(f"{where}: data ends at byte {end} of the data section, but the file holds only "
                         f"{data_size} (truncated?)")


def _from_safetensors(files: dict[str, Path], label: str) -> TensorSource:
    """`files` maps each tensor name to the file holding it."""
    from safetensors import safe_open

    specs, stamps = {}, {}
    for path in sorted(set(files.values())):
        stamps[path] = FileStamp.of(path)  # before the header: a change after it shows at the next read
        for key, info in _safetensors_header(path).items():
            if key in files and files[key] != path:
                continue
            specs[key] = (torch.Size(info["shape"]), _SAFETENSORS_DTYPES[info["dtype"]])
    missing = sorted(k for k in files if k not in specs)
    if missing:
        raise KeyError(f"{label}: the index lists {missing[:3]} but their shard does not hold them")
    handles: dict[Path, object] = {}

    def read(key: str) -> torch.Tensor:
        path = files[key]
        # a file truncated since its header was checked would kill the process with SIGBUS on the mapped read
        stamps[path].check()
        if path not in handles:
            handles[path] = safe_open(str(path), framework="pt")
        return handles[path].get_tensor(key)

    return TensorSource(label, specs, read, list(stamps.values()))


def _files_of(path: Path) -> dict[str, Path]:
    if path.is_dir():
        index = path / SAFETENSORS_INDEX
        if index.exists():
            return _index_files(index)
        single = path / SAFETENSORS_SINGLE
        if single.exists():
            path = single
        else:
            raise FileNotFoundError(
                f"{path}: no {SAFETENSORS_SINGLE} or {SAFETENSORS_INDEX} (only safetensors checkpoints are read)"
            )
    elif not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    return {key: path for key in _safetensors_header(path)}


def _index_files(index: Path) -> dict[str, Path]:
    """Tensor name -> shard file from a sharded checkpoint's index; every shard must lie inside its directory."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as err:
        raise ValueError(f"{index}: not a JSON object ({err})") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"{index}: 'weight_map' must map tensor names to shard file names")
    files = {}
    for key, name in weight_map.items():
        shard = index.parent / name
        # by name, not by resolving links: the Hub's cache links shards to blobs elsewhere, which is fine
        if Path(name).is_absolute() or ".." in Path(os.path.normpath(name)).parts:
            raise ValueError(f"{index}: tensor {key!r} points to {name!r}, outside the checkpoint directory")
        files[key] = shard
    for shard in sorted(set(files.values())):
        if not shard.is_file():
            raise FileNotFoundError(f"{index} names shard {shard.name}, which is missing")
    return files


def open_source(model, label: str | None = None) -> TensorSource:
    """A lazy `TensorSource` over a state dict, module, safetensors file or checkpoint directory."""
    if isinstance(model, TensorSource):
        return model
    if isinstance(model, torch.nn.Module):
        return _from_mapping(model.state_dict(), label or type(model).__name__)
    if isinstance(model, Mapping):
        return _from_mapping(model, label or "state dict")
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        return _from_safetensors(_files_of(path), label or str(path))
    raise TypeError(
        f"{label or 'model'}: expected a state dict, nn.Module or safetensors path, got {type(model).__name__}"
    )


def checkpoint_files(model) -> list[Path]:
    """The files holding the tensors of a safetensors path (one file, or the shards of a directory); [] otherwise."""
    if not isinstance(model, (str, os.PathLike)):
        return []
    return sorted(set(_files_of(Path(model)).values()))
