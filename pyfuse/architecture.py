"""The model a run trains through (an `architecture` callable's, or transformers' from the base) checked against
the checkpoints before any step: a model of another size would be merged and saved with a config that
disagrees with its weights."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from .io.sources import open_source


def check_architecture(model: torch.nn.Module, base: Any, what: str) -> None:
    """Raise naming the tensor (or config entry) where `model` and the base checkpoint disagree.

    Every tensor of the model's state dict must be one of the base's, with its shape (a tensor tied to another
    one, such as an output embedding, may be absent from the base); every floating tensor of the base must
    be one of the model's; and the integer entries (sizes, counts) of the model's config must be the base's
    config.json's.
    """
    base_source = open_source(base, str(base) if isinstance(base, (str, os.PathLike)) else "the base")
    state = model.state_dict()
    stored = {tensor.data_ptr() for key, tensor in state.items() if key in base_source.specs}
    hint = "; its architecture must be the checkpoints' (name an 'architecture' callable that builds it)"
    for key, tensor in state.items():
        if key not in base_source.specs:
            if tensor.data_ptr() in stored:  # tied to a tensor the base holds
                continue
            raise ValueError(f"{what} has a tensor {key!r} that {base_source.label} lacks{hint}")
        if base_source.shape(key) != tensor.shape:
            raise ValueError(f"{what}: tensor {key!r} has shape {list(tensor.shape)}, "
                             f"{list(base_source.shape(key))} in {base_source.label}{hint}")
    missing = [key for key in base_source.keys() if key not in state and base_source.dtype(key).is_floating_point]
    if missing:
        raise ValueError(f"{what} lacks {base_source.label}'s tensor {missing[0]!r} ({len(missing)} in all){hint}")
    config_file = Path(base) / "config.json" if isinstance(base, (str, os.PathLike)) else None
    config = getattr(model, "config", None)
    if config_file is None or not config_file.is_file() or not hasattr(config, "to_dict"):
        return
    saved, built = json.loads(config_file.read_text()), config.to_dict()
    for key, value in saved.items():
        if isinstance(value, int) and not isinstance(value, bool) and key in built and built[key] != value:
            raise ValueError(f"{what}: config {key} is {built[key]!r}, {value!r} in {config_file}{hint}")
