"""Checkpoints of adaptive runs, written atomically (`pyfuse.io.atomic`).

A checkpoint holds everything a run's future depends on (logits, coefficients, optimizer states, the
step, the seed and the settings, the per-task batch counts, the curves so far), so resuming from it
continues to exactly the result of the uninterrupted run.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..io.atomic import atomic_path

CHECKPOINT_FORMAT = 1


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save({"format": CHECKPOINT_FORMAT, **state}, tmp)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"nothing to resume: no checkpoint at {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a pyfuse adaptive-merging checkpoint (format {CHECKPOINT_FORMAT})")
    return state
