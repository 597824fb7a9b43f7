"""Content hashes of input files, for merge reports (sha256: what the Hugging Face Hub lists for LFS files)."""

from __future__ import annotations

import hashlib
import os

_BLOCK = 8 << 20


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    buffer = bytearray(_BLOCK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while size := f.readinto(buffer):
            digest.update(view[:size])
    return digest.hexdigest()
