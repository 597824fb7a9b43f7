"""The eight GLUE tasks of the paper's language experiments, as text-to-text prompts with label words.

Each task's prompt template and label words are those of Appendix D.1 of the Concrete paper, spelled exactly as
the authors' code that fine-tuned their released Flan-T5 LoRA adapters spells them (ASCII quotes, and the
"Answere" typos: adapters react to the exact wording they were trained on). Where the typeset appendix differs
it is only in that spelling, except MNLI, whose appendix example puts the hypothesis in the premise slot; the
authors' code puts the premise there, as here. The validation split is the test set (MNLI: validation_matched).

STS-B is a regression task (similarity in [0, 5]); the paper turns it into text with `"{:.1f}".format(label)`.
Here its classes are the 51 strings "0.0" ... "5.0" that formatting can produce, a label is the class of its
formatted string, and the metric is Spearman's rho between the predicted and the (so formatted) true scores,
as the authors compute it from the generated and the target strings.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

DATASET_ID = "nyu-mll/glue"
METRICS = ("accuracy", "spearman")


class GlueDataNotFoundError(FileNotFoundError):
    """A GLUE task's data is neither at the given path nor in the local `datasets` cache."""


@dataclass(frozen=True)
class GlueSpec:
    """One GLUE task: where its data is, how an example becomes a prompt, and how predictions are scored.

    Attributes:
        name: the task's name here (lower case, no dash: "sst2", "stsb").
        config: the `datasets` config name of `dataset_id`.
        fields: the text columns the template uses, in GLUE's column names.
        template: the prompt, with `{field}` placeholders.
        label_words: class c's target text.
        split: the split used as the test set.
        metric: "accuracy", or "spearman" (STS-B).
        dataset_id: the `datasets` hub id.
    """

    name: str
    config: str
    fields: tuple[str, ...]
    template: str
    label_words: tuple[str, ...]
    split: str = "validation"
    metric: str = "accuracy"
    dataset_id: str = DATASET_ID

    @property
    def num_classes(self) -> int:
        return len(self.label_words)

    def prompt(self, example: Mapping) -> str:
        """The model input for one example (a row with this task's text columns)."""
        return self.template.format(**{field: example[field] for field in self.fields})

    def label_index(self, label: float) -> int:
        """The class of a GLUE label: the label itself, or for STS-B the class of its one-decimal string."""
        if self.metric == "spearman":
            text = f"{float(label):.1f}"
            if text not in self.label_words:
                raise ValueError(f"{self.name}: score {label!r} is outside [0, 5]")
            return self.label_words.index(text)
        if isinstance(label, float) and not label.is_integer():
            raise ValueError(f"{self.name}: label {label!r} is not a class index")
        if not 0 <= int(label) < self.num_classes:
            raise ValueError(f"{self.name}: label {label!r} is not one of the {self.num_classes} classes "
                             f"(GLUE's test splits are unlabelled (-1); evaluate on {self.split!r})")
        return int(label)

    def evaluate(self, scores: torch.Tensor, labels: torch.Tensor) -> float:
        """The task's metric for class scores `[N, C]` (the prediction is the best class) and labels `[N]`.

        Spearman's rho of STS-B compares class indices, which rank exactly as the scores they stand for
        (class c is the score c / 10); it is nan when the predictions (or the labels) are all equal.
        """
        if scores.dim() != 2 or scores.shape[1] != self.num_classes or labels.shape != scores.shape[:1]:
            raise ValueError(f"{self.name}: expected scores [N, {self.num_classes}] and labels [N], got "
                             f"{list(scores.shape)} and {list(labels.shape)}")
        if scores.shape[0] == 0:
            raise ValueError(f"{self.name}: no examples to evaluate")
        predicted = scores.argmax(dim=-1).cpu()
        labels = labels.cpu()
        if self.metric == "accuracy":
            return float((predicted == labels).double().mean())
        if predicted.unique().numel() < 2 or labels.unique().numel() < 2:
            return float("nan")  # a rank correlation with a constant is undefined
        from scipy.stats import spearmanr

        return float(spearmanr(predicted.numpy(), labels.numpy()).statistic)


_YES_NO = ("yes", "no")
_NO_YES = ("no", "yes")

GLUE_TASKS: dict[str, GlueSpec] = {
    spec.name: spec
    for spec in (
        GlueSpec("cola", "cola", ("sentence",),
                 "Indicate if the following sentence is grammatically correct or not: \"{sentence}\". "
                 "Answere 'acceptable' or 'unacceptable'.",
                 ("unacceptable", "acceptable")),
        GlueSpec("mnli", "mnli", ("premise", "hypothesis"),
                 "Does the premise: '{premise}' logically imply, contradict, or is neutral to the hypothesis: "
                 "'{hypothesis}'? Answere with 'entailment', 'contradiction', or 'neutral'.",
                 ("entailment", "neutral", "contradiction"), split="validation_matched"),
        GlueSpec("mrpc", "mrpc", ("sentence1", "sentence2"),
                 "Are the following sentences '{sentence1}' and '{sentence2}' conveying the same meaning? "
                 "Answere with 'yes' or 'no'.",
                 _NO_YES),
        GlueSpec("qnli", "qnli", ("question", "sentence"),
                 "Given the context: '{sentence}', does the question '{question}' have an answer based on the "
                 "information provided? Answer with 'yes' or 'no'.",
                 _YES_NO),
        GlueSpec("qqp", "qqp", ("question1", "question2"),
                 "Do the questions '{question1}' and '{question2}' have the same intent? Answere with 'yes' or 'no'.",
                 _NO_YES),
        GlueSpec("rte", "rte", ("sentence1", "sentence2"),
                 "Does the text: '{sentence1}' entail that '{sentence2}' is true? Provide 'yes' or 'no'.",
                 _YES_NO),
        GlueSpec("sst2", "sst2", ("sentence",),
                 "Given the sentence '{sentence}', determine the sentiment. Is it positive or negative?",
                 ("negative", "positive")),
        GlueSpec("stsb", "stsb", ("sentence1", "sentence2"),
                 "Consider the sentences '{sentence1}' and '{sentence2}'. On a scale from 1 (completely different) "
                 "to 5 (completely similar), rate the similarity.",
                 tuple(f"{tenths / 10:.1f}" for tenths in range(51)), metric="spearman"),
    )
}
"""The paper's eight GLUE tasks by name, in the paper's order."""


def glue_spec(name: str) -> GlueSpec:
    """A task's spec by name, in any common spelling ("SST-2", "sst2", "STS-B", "stsb", "CoLA")."""
    key = name.lower().replace("-", "").replace("_", "")
    if key not in GLUE_TASKS:
        raise KeyError(f"unknown GLUE task {name!r}; the tasks are {list(GLUE_TASKS)}")
    return GLUE_TASKS[key]


def load_glue(task: str | GlueSpec, split: str | None = None, *, path: str | os.PathLike | None = None,
              cache_dir: str | os.PathLike | None = None):
    """One split (default: the task's test split) of a GLUE task as a `datasets.Dataset`.

    With `path`: a directory written by `save_to_disk`, of this task's `DatasetDict` or `Dataset`, or a root
    holding one such directory per task, named by config ("cola", "mnli", ...). Without: `datasets.load_dataset`
    on `nyu-mll/glue`, which reads the local cache (and the hub only when not offline). Missing data, splits or
    columns raise before any tokenisation, saying how to provide them.
    """
    import datasets

    spec = task if isinstance(task, GlueSpec) else glue_spec(task)
    split = split or spec.split
    if path is not None:
        root = Path(path).expanduser()
        directory = root / spec.config if (root / spec.config).is_dir() else root
        if not directory.is_dir():
            raise GlueDataNotFoundError(f"GLUE {spec.name}: no such directory {directory}")
        try:
            data = datasets.load_from_disk(str(directory))
        except FileNotFoundError as err:
            raise GlueDataNotFoundError(f"GLUE {spec.name}: {directory} is not a dataset written by save_to_disk "
                                        f"({err})") from None
        if isinstance(data, datasets.DatasetDict):
            if split not in data:
                raise GlueDataNotFoundError(f"GLUE {spec.name}: {directory} has splits {list(data)}, not {split!r}")
            data = data[split]
    else:
        try:
            data = datasets.load_dataset(spec.dataset_id, spec.config, split=split, cache_dir=cache_dir)
        except Exception as err:
            raise GlueDataNotFoundError(
                f"GLUE {spec.name}: {spec.dataset_id!r} config {spec.config!r} split {split!r} is not in the local "
                f"datasets cache and could not be fetched ({type(err).__name__}: {str(err).splitlines()[0][:200]}). "
                f"On a machine with internet run `datasets.load_dataset({spec.dataset_id!r}, {spec.config!r})"
                f".save_to_disk(DIR)` and pass path=DIR, or copy its datasets cache"
            ) from err
    missing = [column for column in (*spec.fields, "label") if column not in data.column_names]
    if missing:
        raise ValueError(f"GLUE {spec.name}: the data has columns {data.column_names}, missing {missing}")
    return data


def glue_batches(spec: GlueSpec, dataset, tokenizer, *, batch_size: int = 16, max_length: int = 512,
                 limit: int | None = None, shuffle_seed: int | None = None) -> list[dict[str, torch.Tensor]]:
    """Tokenised prompts, `{"input_ids", "attention_mask"}` `[B, T]` padded to the batch's longest: the unlabeled
    batches of test-time adaptation. `shuffle_seed` draws the example order from a seeded generator (the same
    list in every process); `limit` keeps the first examples of that order."""
    return [batch for batch, _ in _encode(spec, dataset, tokenizer, batch_size, max_length, limit, shuffle_seed,
                                          labelled=False)]


def glue_test_data(spec: GlueSpec, dataset, tokenizer, *, batch_size: int = 16, max_length: int = 512,
                   limit: int | None = None) -> list[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    """`(batch, labels)` pairs in dataset order, labels `[B]` as class indices (`GlueSpec.label_index`)."""
    return _encode(spec, dataset, tokenizer, batch_size, max_length, limit, None, labelled=True)


def _encode(spec: GlueSpec, dataset, tokenizer, batch_size: int, max_length: int, limit: int | None,
            shuffle_seed: int | None, labelled: bool) -> list[tuple[dict[str, torch.Tensor], torch.Tensor | None]]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order: Sequence[int] = range(len(dataset))
    if shuffle_seed is not None:
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(shuffle_seed)).tolist()
    if limit is not None:
        order = order[:limit]
    out = []
    for start in range(0, len(order), batch_size):
        rows = dataset.select(order[start:start + batch_size])
        encoded = tokenizer([spec.prompt(row) for row in rows], padding="longest", truncation=True,
                            max_length=max_length, return_tensors="pt")
        batch = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
        labels = torch.tensor([spec.label_index(row["label"]) for row in rows]) if labelled else None
        out.append((batch, labels))
    return out
