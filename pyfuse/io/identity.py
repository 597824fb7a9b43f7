"""What a run read, so that a change is noticed: input files' stamps and hashes, and digests of task batches.

A `FileStamp` (size, mtime, inode, device) is taken when a file is opened or hashed and compared again
before each read and before a run commits: a file replaced, rewritten or truncated meanwhile fails the run,
naming it, instead of merging a mix of versions (or dying of SIGBUS on a memory-mapped read past the end).
`InputIdentity` is the sha256 of every file of a run's models, recorded in checkpoints and reports;
`update_digest` folds a task's batches, as they are produced, into a hash of its data.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .hashing import sha256_file

_HASH_ELEMENTS = 1 << 24


class InputChanged(RuntimeError):
    """An input file changed while a run was reading it; nothing was committed."""


@dataclass(frozen=True)
class FileStamp:
    """A file's size, modification time and identity (inode, device) at one moment."""

    path: Path
    size: int
    mtime_ns: int
    inode: int
    device: int

    @classmethod
    def of(cls, path: str | os.PathLike) -> FileStamp:
        status = os.stat(path)
        return cls(Path(path), status.st_size, status.st_mtime_ns, status.st_ino, status.st_dev)

    def check(self) -> None:
        """Raise `InputChanged`, naming the file and what differs, unless it is as stamped."""
        try:
            now = FileStamp.of(self.path)
        except FileNotFoundError:
            raise InputChanged(f"{self.path}: input removed while this run read it; nothing was committed") from None
        differ = [what for what, before, after in (
            ("size", self.size, now.size), ("modification time", self.mtime_ns, now.mtime_ns),
            ("inode", (self.inode, self.device), (now.inode, now.device))) if before != after]
        if differ:
            size = f" ({self.size} -> {now.size} bytes)" if self.size != now.size else ""
            raise InputChanged(f"{self.path}: input changed while this run read it ({', '.join(differ)}{size}); "
                               "nothing was committed; run again once it stays put")


@dataclass
class InputIdentity:
    """The sha256 of every file of a run's models, by role ("base" or the model's name), and their stamps."""

    files: dict[str, list[dict[str, Any]]]
    stamps: list[FileStamp]

    @classmethod
    def of_files(cls, files_by_role: Mapping[str, Sequence[str | os.PathLike]]) -> InputIdentity:
        """Hash the files of each role (`pyfuse.io.sources.checkpoint_files` of a model; in-memory ones have none)."""
        files, stamps = {}, []
        for role, paths in files_by_role.items():
            entries = []
            for path in paths:
                stamp = FileStamp.of(path)  # before hashing: a change during the hash shows at the next check
                entries.append({"file": str(Path(path).resolve()), "bytes": stamp.size, "sha256": sha256_file(path)})
                stamps.append(stamp)
            files[role] = entries
        return cls(files, stamps)

    def check_unchanged(self) -> None:
        for stamp in self.stamps:
            stamp.check()


def update_digest(digest: Any, value: Any) -> None:
    """Fold `value` (tensors, and mappings, sequences, strings and numbers of them) into `digest` (a hashlib
    object), by content: equal batches give equal digests in any process."""
    if isinstance(value, torch.Tensor):
        digest.update(f"tensor{str(value.dtype)}{list(value.shape)}".encode())
        flat = value.detach().reshape(-1)
        for lo in range(0, flat.numel(), _HASH_ELEMENTS):  # in pieces: no whole copy of a large (or GPU) tensor
            digest.update(flat[lo:lo + _HASH_ELEMENTS].to("cpu").contiguous().view(torch.uint8).numpy())
    elif isinstance(value, Mapping):
        digest.update(f"map{len(value)}".encode())
        for key in sorted(value, key=str):
            update_digest(digest, str(key))
            update_digest(digest, value[key])
    elif isinstance(value, (list, tuple)):
        digest.update(f"seq{len(value)}".encode())
        for item in value:
            update_digest(digest, item)
    elif isinstance(value, (str, bytes, int, float, bool)) or value is None:
        digest.update(f"{type(value).__name__}:{value!r}".encode())
    else:  # an object without a content representation: its type alone (never a false difference)
        digest.update(f"object:{type(value).__qualname__}".encode())


def new_digest() -> Any:
    return hashlib.sha256()
