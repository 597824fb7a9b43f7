"""Where a model's files are: a local directory, or a Hugging Face hub id looked up in the local cache first.

Every adapter resolves its checkpoints here, so a missing model fails the same way everywhere: before any
work starts, with the id, the directory that was searched, the file that is missing and how to provide it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
"""Any one of these holds a transformers checkpoint's weights."""


class ModelNotFoundError(FileNotFoundError):
    """A model (or one of its files) is neither in the given directory nor in the local hub cache."""


def resolve_model_dir(name_or_path: str | os.PathLike, *, required: Sequence[str] = ("config.json",),
                      any_of: Sequence[str] = WEIGHT_FILES, what: str = "model") -> Path:
    """The local directory holding `name_or_path`'s files, with every `required` file and one of `any_of`.

    A path that exists is used as is. Otherwise `name_or_path` is a hub id: the local Hugging Face cache is
    tried first; the hub itself only when `HF_HUB_OFFLINE` is not set. Errors say which file is missing.
    """
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelNotFoundError(f"{what} {str(name_or_path)!r}: expected a directory, found a file")
        _check_files(path, required, any_of, what, str(name_or_path))
        return path
    name = str(name_or_path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelNotFoundError(f"{what} {name!r}: no such directory")
    directory = _from_hub(name, what)
    _check_files(directory, required, any_of, what, name)
    return directory


def _check_files(directory: Path, required: Sequence[str], any_of: Sequence[str], what: str, name: str) -> None:
    missing = [f for f in required if not (directory / f).exists()]
    if any_of and not any((directory / f).exists() for f in any_of):
        missing.append(" or ".join(any_of))
    if missing:
        raise ModelNotFoundError(
            f"{what} {name!r}: {directory} has no {', '.join(missing)}; provide a complete checkpoint directory "
            f"(as written by save_pretrained) or a hub id that is in the local cache"
        )


def _from_hub(repo_id: str, what: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - transformers always brings it
        raise ModelNotFoundError(f"{what} {repo_id!r}: not a local directory, and huggingface_hub is not installed "
                                 f"to look it up as a hub id (pip install huggingface_hub)") from None
    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception as cached_error:
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        if not offline:
            try:
                return Path(snapshot_download(repo_id))
            except Exception as err:
                reason = f"downloading it failed ({type(err).__name__}: {str(err).splitlines()[0][:200]})"
        else:
            reason = "HF_HUB_OFFLINE is set"
        cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HF_HOME") or "~/.cache/huggingface"
        raise ModelNotFoundError(
            f"{what} {repo_id!r} is not a local directory and not in the Hugging Face cache ({cache}); {reason}. "
            f"On a machine with internet run `huggingface-cli download {repo_id}` (then copy the cache), "
            f"or pass the path of a directory holding its files"
        ) from cached_error
