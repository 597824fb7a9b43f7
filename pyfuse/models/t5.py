"""Flan-T5 as a text-to-text classifier on GLUE, with LoRA task vectors: the paper's language experiments.

A class's score is the log-likelihood the model gives its label word's token sequence (the word, then `</s>`,
exactly the target the adapters were trained to generate) under teacher forcing, so a task's class scores
`[B, C]` are proper log-probabilities of the C possible answers: softmax over them is the model's distribution
restricted to those answers, which entropy minimisation and accuracy (argmax) use.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence

import torch

from ..data.glue import GlueSpec, glue_batches, glue_spec, glue_test_data
from ..task import ModelCall, Task, evaluate_tasks
from ..taskvectors import TaskVectors
from .hub import resolve_model_dir
from .lora import lora_factored_task_vectors, lora_task_vectors

DEFAULT_BASE = "google/flan-t5-base"
TOKENIZER_FILES = ("tokenizer.json", "spiece.model")


def paper_adapter_id(task: str, size: str = "base") -> str:
    """The hub id of the authors' LoRA adapter (r=16, alpha=32) of `google/flan-t5-{size}` for a GLUE task."""
    if size not in ("base", "large"):
        raise ValueError(f"the paper's Flan-T5 sizes are 'base' and 'large', got {size!r}")
    return f"tanganke/flan-t5-{size}_glue-{glue_spec(task).name}_lora-16"


def load_flan_t5(name_or_path: str | os.PathLike = DEFAULT_BASE, *, dtype: torch.dtype = torch.float32):
    """`(model, tokenizer)`: a `T5ForConditionalGeneration` (eval mode) and its tokenizer, from a directory or a
    hub id in the local cache (`resolve_model_dir`); missing files raise before anything is loaded."""
    from transformers import AutoTokenizer, T5ForConditionalGeneration

    directory = resolve_model_dir(name_or_path, what="Flan-T5 model")
    resolve_model_dir(directory, required=(), any_of=TOKENIZER_FILES, what="Flan-T5 tokenizer")
    # .to() rather than from_pretrained's dtype argument, whose name changed across transformers releases
    model = T5ForConditionalGeneration.from_pretrained(directory).to(dtype).eval()
    return model, AutoTokenizer.from_pretrained(directory)


def glue_task_vectors(model, adapters: Mapping[str, object], *, dtype: torch.dtype = torch.float32,
                      progress: bool = False, factored: bool = False) -> TaskVectors:
    """Task vectors of LoRA adapters (paths, hub ids or `peft` models), named by GLUE task (`{"cola": ...}`),
    over the tensors they target in `model` (a module, state dict or safetensors path of the base); with
    `factored`, kept as the adapters' factors (`TaskVectors.from_lora`)."""
    names = [glue_spec(name).name for name in adapters]
    if factored:
        return lora_factored_task_vectors(model, list(adapters.values()), names=names, dtype=dtype)
    return lora_task_vectors(model, list(adapters.values()), names=names, dtype=dtype, progress=progress)


class LabelWordScorer:
    """Class scores `[B, C]` of a T5 model: the teacher-forced log-likelihood of each label word given the prompt.

    The encoder runs once per example; the decoder runs once per (example, class) over the label's tokens
    (padded to the longest label, padding masked out). Usable as `Task.logits`: `scorer(call, batch)` with
    `call` the model or merged parameters bound to it, and `batch` holding `input_ids` and `attention_mask`.
    """

    def __init__(self, tokenizer, label_words: Sequence[str], *, decoder_start_token_id: int):
        if len(label_words) < 2:
            raise ValueError(f"need at least two label words, got {list(label_words)}")
        sequences = [list(tokenizer(word)["input_ids"]) for word in label_words]
        for word, ids in zip(label_words, sequences):
            if not ids:
                raise ValueError(f"label word {word!r} tokenises to nothing")
            if tokenizer.unk_token_id is not None and tokenizer.unk_token_id in ids:
                raise ValueError(f"label word {word!r} contains tokens the tokenizer does not know: {ids}")
        if len({tuple(ids) for ids in sequences}) != len(sequences):
            raise ValueError(f"label words {list(label_words)} do not all tokenise differently")
        length = max(len(ids) for ids in sequences)
        self.label_words = tuple(label_words)
        self.targets = torch.zeros(len(sequences), length, dtype=torch.long)
        self.valid = torch.zeros(len(sequences), length, dtype=torch.bool)
        for row, ids in enumerate(sequences):
            self.targets[row, :len(ids)] = torch.tensor(ids)
            self.valid[row, :len(ids)] = True
        # Teacher forcing: the decoder sees the start token, then the target shifted right by one.
        self.decoder_inputs = torch.cat(
            [torch.full((len(sequences), 1), decoder_start_token_id, dtype=torch.long), self.targets[:, :-1]], dim=1
        )

    @classmethod
    def for_model(cls, model, tokenizer, label_words: Sequence[str]) -> LabelWordScorer:
        """A scorer using `model.config.decoder_start_token_id`."""
        return cls(tokenizer, label_words, decoder_start_token_id=model.config.decoder_start_token_id)

    def __call__(self, call: ModelCall, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        size, classes = input_ids.shape[0], self.targets.shape[0]
        device = input_ids.device
        # The first call is for the encoder states (its one-token decoder pass is negligible); the second
        # decodes every label of every example against them without re-running the encoder per class.
        encoded = call(input_ids=input_ids, attention_mask=attention_mask,
                       decoder_input_ids=self.decoder_inputs[:1, :1].to(device).expand(size, 1))
        hidden = encoded.encoder_last_hidden_state.repeat_interleave(classes, dim=0)
        decoded = call(encoder_outputs=(hidden,), attention_mask=attention_mask.repeat_interleave(classes, dim=0),
                       decoder_input_ids=self.decoder_inputs.to(device).repeat(size, 1))
        logits = decoded.logits.float()
        targets = self.targets.to(device).repeat(size, 1)
        # log p(token) = logit(token) - logsumexp(logits): no [B*C, L, V] log-softmax tensor kept for backward.
        token_logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(dim=-1)
        return (token_logp * self.valid.to(device).repeat(size, 1)).sum(dim=-1).view(size, classes)


def glue_task(name: str, model, tokenizer, dataset, *, batch_size: int = 16, max_length: int = 512,
              adapt_limit: int | None = None, test_limit: int | None = None, seed: int = 0) -> Task:
    """A `pyfuse.Task` for one GLUE task on `dataset` (its test split, e.g. from `load_glue`).

    Its unlabeled batches are the test examples in a seeded random order (test-time adaptation, as AdaMerging
    does; `adapt_limit` keeps that many), its test data the labelled examples in order (`test_limit`), and its
    logits the `LabelWordScorer` of the task's label words, and its metric the paper's (accuracy, or
    Spearman's rho for STS-B).
    """
    spec = glue_spec(name)
    return Task(
        name=spec.name,
        batches=glue_batches(spec, dataset, tokenizer, batch_size=batch_size, max_length=max_length,
                             limit=adapt_limit, shuffle_seed=seed),
        logits=LabelWordScorer.for_model(model, tokenizer, spec.label_words),
        test_data=glue_test_data(spec, dataset, tokenizer, batch_size=batch_size, max_length=max_length,
                                 limit=test_limit),
        metric=spec.evaluate,
    )


def evaluate_glue(call: ModelCall, task: Task, spec: GlueSpec | None = None) -> float:
    """The paper's metric of `call` on a task's test data: accuracy, or Spearman's rho for STS-B.

    `spec` defaults to the GLUE task named like `task`.
    """
    spec = spec or glue_spec(task.name)
    if task.test_data is None:
        raise ValueError(f"task {task.name!r} has no test data")
    return evaluate_tasks(call, [dataclasses.replace(task, metric=spec.evaluate)])[task.name]
