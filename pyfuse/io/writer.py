"""Writing a checkpoint as sharded safetensors, tensor by tensor and chunk by chunk, all or nothing.

Everything is written into a hidden temporary directory beside the output and renamed to the output
name only when complete (`pyfuse.io.atomic`), so an interrupted run leaves no half-written checkpoint;
the output must have been cleared by `check_output_dir` first. Shards are `model-0000k-of-0000n.safetensors` with
`model.safetensors.index.json`, the layout `transformers`' `from_pretrained` reads.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from ..ops.profiling import nvtx_range
from .atomic import OutputDir, commit_dir
from .sources import _SAFETENSORS_DTYPES, SAFETENSORS_INDEX

DTYPE_CODES = {dtype: code for code, dtype in _SAFETENSORS_DTYPES.items()}
# files of a model directory that hold weights, which a merge replaces rather than copies
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx", ".npz")
SMALL_FILE_BYTES = 64 << 20
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as "5GB", "200MB" (powers of 10) or "1GiB" (powers of 2)."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*", str(size), flags=re.IGNORECASE)
        if match is None or match.group(2).upper() not in _UNITS:
            raise ValueError(f"not a size: {size!r} (expected e.g. 5GB, 200MB or 1GiB)")
        value = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
    if value <= 0:
        raise ValueError(f"size must be positive, got {size!r}")
    return value


def small_files(model_dir: Path) -> list[Path]:
    """The files of a model directory worth copying beside merged weights: config, tokenizer, and the like."""
    picked = []
    for path in sorted(model_dir.iterdir()):
        name = path.name
        if name.startswith(".") or not path.is_file() or name.endswith(WEIGHT_SUFFIXES):
            continue
        if name.endswith(".index.json") or path.stat().st_size > SMALL_FILE_BYTES:
            continue
        picked.append(path)
    return picked


class ShardedWriter:
    """Writes the tensors `entries` (name, shape, dtype), in that order, into shards of at most `max_shard_bytes`.

    Use as a context manager; call `write_tensor` for every entry in order, optionally `write_file` or
    `copy_file`, then `commit()`. Leaving the block without committing removes everything written.

    Several processes can write one checkpoint (`pyfuse.distributed`): `starts` splits the entries into
    contiguous parts (part r is `[starts[r], starts[r + 1])`), no shard spans two parts, and the writer
    of `part` writes that part's entries only. Part 0's writer makes the temporary directory, the others
    write into it (`join`), and part 0's commits once every part is written.
    """

    def __init__(self, out: OutputDir, entries: Sequence[tuple[str, torch.Size, torch.dtype]], max_shard_bytes: int,
                 starts: Sequence[int] | None = None, part: int = 0):
        self.out = out
        for name, _, dtype in entries:
            if dtype not in DTYPE_CODES:
                raise TypeError(f"tensor {name!r}: safetensors cannot store {dtype}")
        self._entries = [(name, torch.Size(shape), dtype) for name, shape, dtype in entries]
        starts = [0, len(self._entries)] if starts is None else list(starts)
        self._shards = [shard for lo, hi in zip(starts, starts[1:]) for shard in self._plan_shards(lo, hi,
                                                                                                     max_shard_bytes)]
        self._shard_of = {index: k for k, members in enumerate(self._shards) for index in members}
        count = len(self._shards)
        self.shard_names = [f"model-{k + 1:05d}-of-{count:05d}.safetensors" for k in range(count)]
        self.total_bytes = sum(_nbytes(shape, dtype) for _, shape, dtype in self._entries)
        self._tmp: Path | None = None
        self._owner = part == 0  # makes, removes and commits the directory
        self._next, self._end = starts[part], starts[part + 1]  # the next entry to write, the end of the part
        self._file = None
        self.committed = False

    def _plan_shards(self, lo: int, hi: int, max_shard_bytes: int) -> list[list[int]]:
        shards: list[list[int]] = []
        size = 0
        for index in range(lo, hi):
            _, shape, dtype = self._entries[index]
            nbytes = _nbytes(shape, dtype)
            if not shards or (shards[-1] and size + nbytes > max_shard_bytes):
                shards.append([])
                size = 0
            shards[-1].append(index)
            size += nbytes
        return shards or ([[]] if lo == 0 and hi == 0 else [])

    def __enter__(self) -> ShardedWriter:
        if self._owner:
            self._tmp = self.out.partial_name()
            self._tmp.parent.mkdir(parents=True, exist_ok=True)
            self._tmp.mkdir()
        return self

    def join(self, path: Path) -> None:
        """Write into `path`, the temporary directory part 0's writer made."""
        if self._owner:
            raise RuntimeError("part 0's writer makes the directory; it joins none")
        self._tmp = Path(path)

    def __exit__(self, *exc) -> None:
        try:
            if self._file is not None:
                file, self._file = self._file, None
                file.close()  # flushes: on a full disk this raises again, after which the removal must still run
        finally:
            if self._owner and not self.committed and self._tmp is not None:
                shutil.rmtree(self._tmp, ignore_errors=True)

    @property
    def path(self) -> Path:
        """The temporary directory being written (renamed to `out` on commit)."""
        if self._tmp is None:
            raise RuntimeError("ShardedWriter must be used as a context manager")
        return self._tmp

    def _open_shard(self, k: int) -> None:
        header, offset = {}, 0
        for index in self._shards[k]:
            name, shape, dtype = self._entries[index]
            nbytes = _nbytes(shape, dtype)
            header[name] = {"dtype": DTYPE_CODES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        header["__metadata__"] = {"format": "pt"}
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        self._file = open(self.path / self.shard_names[k], "wb")
        self._file.write(len(blob).to_bytes(8, "little"))
        self._file.write(blob)

    def write_tensor(self, name: str, chunks: Iterable[torch.Tensor]) -> None:
        """Write the next tensor from flat chunks (converted to its dtype) that together hold all its elements."""
        if self._next >= self._end or self._entries[self._next][0] != name:
            expected = self._entries[self._next][0] if self._next < self._end else "nothing"
            raise RuntimeError(f"tensors must be written in the planned order: got {name!r}, expected {expected!r}")
        _, shape, dtype = self._entries[self._next]
        k = self._shard_of[self._next]
        if self._shards[k][0] == self._next:
            self._open_shard(k)
        written = 0
        for chunk in chunks:
            with nvtx_range("engine.write"):
                data = chunk.detach().to(device="cpu", dtype=dtype).contiguous().reshape(-1)
                self._file.write(memoryview(data.view(torch.uint8).numpy()))
            written += data.numel()
        if written != shape.numel():
            raise ValueError(f"tensor {name!r}: got {written} elements, expected {shape.numel()} for shape "
                             f"{list(shape)}")
        if self._shards[k][-1] == self._next:
            self._file.close()
            self._file = None
        self._next += 1

    def write_file(self, name: str, data: str | bytes) -> None:
        (self.path / name).write_bytes(data.encode() if isinstance(data, str) else data)

    def copy_file(self, source: Path) -> None:
        shutil.copyfile(source, self.path / source.name)

    def commit(self) -> Path:
        """Write the index and move the finished directory to `out` (replacing only the directory checked).

        With several parts, the caller makes sure the other parts are written first."""
        if not self._owner:
            raise RuntimeError("only part 0's writer commits")
        if self._next != self._end:
            raise RuntimeError(f"only {self._next} of {self._end} tensors were written")
        weight_map = {self._entries[i][0]: self.shard_names[k] for k, members in enumerate(self._shards)
                      for i in members}
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        self.write_file(SAFETENSORS_INDEX, json.dumps(index, indent=2) + "\n")
        commit_dir(self.path, self.out)
        self.committed = True
        return self.out.path


def _nbytes(shape: torch.Size, dtype: torch.dtype) -> int:
    return shape.numel() * torch.empty((), dtype=dtype).element_size()
