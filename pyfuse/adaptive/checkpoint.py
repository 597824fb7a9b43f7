"""Checkpoints of adaptive runs, written atomically (`pyfuse.io.atomic`) and checked by content when read.

A checkpoint holds everything a run's future depends on (logits, coefficients, optimizer states, the
step, the seed and the settings, the identity of the inputs and of the data drawn, the per-task batch
counts, the curves so far), so resuming from it continues to exactly the result of the uninterrupted run.

The file is one header line, `pyfuse-adaptive-checkpoint <format> sha256=<hex>`, then the state as
`torch.save` writes it; the sha256 is of those bytes. A flipped bit, a truncated or foreign file is refused
by `load_checkpoint` with a one-line `CheckpointError` naming the file, before anything is unpickled.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from pathlib import Path
from typing import Any

import torch

from ..io.atomic import atomic_path

CHECKPOINT_FORMAT = 2
_MAGIC = b"pyfuse-adaptive-checkpoint"
_HEADER = re.compile(rb"pyfuse-adaptive-checkpoint (\d+) sha256=([0-9a-f]{64})\n")


class CheckpointError(ValueError):
    """A file that is not an intact checkpoint of this format; the message names it."""


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save({"format": CHECKPOINT_FORMAT, **state}, tmp)
        payload = tmp.read_bytes()
        digest = hashlib.sha256(payload).hexdigest().encode()
        with open(tmp, "wb") as f:
            f.write(b"%s %d sha256=%s\n" % (_MAGIC, CHECKPOINT_FORMAT, digest))
            f.write(payload)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"nothing to resume: no checkpoint at {path}")
    data = path.read_bytes()
    if not data:
        raise CheckpointError(f"{path}: empty file, not a checkpoint; start afresh with --force")
    header = _HEADER.match(data[:len(_MAGIC) + 100])
    if header is None:
        older = " (an earlier pyfuse's, without a checksum)" if data.startswith(b"PK") else ""
        raise CheckpointError(f"{path}: not a pyfuse adaptive-merging checkpoint{older}; start afresh with --force")
    if int(header.group(1)) != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {int(header.group(1))}, this pyfuse reads format "
                              f"{CHECKPOINT_FORMAT}; start afresh with --force")
    payload = memoryview(data)[header.end():]
    if hashlib.sha256(payload).hexdigest() != header.group(2).decode():
        raise CheckpointError(f"{path}: corrupted (its content does not match its sha256); refusing to resume "
                              "from it; start afresh with --force")
    try:
        state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as err:  # intact bytes that torch cannot read: a writer of another version
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: cannot be read as a checkpoint ({reason:.200})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a pyfuse adaptive-merging checkpoint (format {CHECKPOINT_FORMAT})")
    return state
