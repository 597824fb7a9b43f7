"""`Task`: what test-time adaptation needs from one task, for any classifier.

A task is a name, a stream of unlabeled batches, and a function that turns (model call, batch) into class
logits. The model call runs the user's model on the merged parameters; heads, prompts or any other
task-specific pieces live in the task's function and are not merged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from .device import OnDevice, to_device
from .io.identity import new_digest, update_digest

ModelCall = Callable[..., Any]
"""`call(*args, **kwargs)` runs the user's model with the merged parameters and returns its output."""


@dataclass
class Task:
    """One task of the merge.

    Attributes:
        name: the task's name; it must match the name of its task vector.
        batches: unlabeled inputs, re-iterated from the start whenever it runs out. For `--resume` to
            reproduce a run exactly, iterating it must give the same sequence in a fresh process (a list,
            or a DataLoader whose shuffling generator is seeded where it is built).
        logits: `logits(call, batch) -> [B, C]` class logits of the merged model on `batch`.
        test_data: optional labelled data, an iterable of `(batch, labels)` pairs, for accuracy curves.
        metric: optional `metric(scores [N, C], labels [N]) -> float` over the whole test data, higher is
            better, in place of accuracy (e.g. Spearman's rho for STS-B).
    """

    name: str
    batches: Iterable
    logits: Callable[[ModelCall, Any], torch.Tensor]
    test_data: Iterable | None = None
    metric: Callable[[torch.Tensor, torch.Tensor], float] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"a task needs a non-empty string name, got {self.name!r}")
        if not isinstance(self.batches, Iterable):
            raise TypeError(f"task {self.name!r}: batches must be iterable, got {type(self.batches).__name__}")
        if not callable(self.logits):
            raise TypeError(f"task {self.name!r}: logits must be callable, got {type(self.logits).__name__}")


class BatchStream:
    """Endless batches of one task that counts what it hands out, so a resumed run can skip as many."""

    def __init__(self, task: Task):
        self.task = task
        self.drawn = 0
        self.data = new_digest()  # of every batch handed out, in order: what a resumed run must draw again
        self._iterator: Iterator | None = None
        # Batches handed out on a device are fingerprinted as the task produced them, on the host: hashing
        # them on the device would copy every batch back (and a stand-in device holds no data at all).
        batches = task.batches
        self._produced, self._device = ((batches.items, batches.device) if isinstance(batches, OnDevice)
                                        else (batches, None))

    def next(self) -> Any:
        batch = self._next()
        update_digest(self.data, batch)
        return batch if self._device is None else to_device(batch, self._device)

    def _next(self) -> Any:
        if self._iterator is not None:
            batch = next(self._iterator, _END)
            if batch is not _END:
                self.drawn += 1
                return batch
        self._iterator = iter(self._produced)
        batch = next(self._iterator, _END)
        if batch is _END:
            raise ValueError(
                f"task {self.task.name!r}: its batches are empty"
                + (" (a one-shot iterator cannot be cycled; pass a list or a DataLoader)" if self.drawn else "")
            )
        self.drawn += 1
        return batch

    def skip_to(self, drawn: int) -> None:
        """Draw (and drop) batches until `drawn` have been handed out in total."""
        while self.drawn < drawn:
            update_digest(self.data, self._next())  # fingerprinted like a batch handed out, never moved


_END = object()


def entropy_loss(logits: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of the prediction entropy `-sum_c p_c log(p_c + 1e-8)`, as AdaMerging defines it."""
    if logits.dim() != 2:
        raise ValueError(f"expected class logits of shape [B, C], got {list(logits.shape)}")
    p = logits.float().softmax(dim=-1)
    return -(p * torch.log(p + 1e-8)).sum(dim=-1).mean()


def task_predictions(call: ModelCall, tasks: Iterable[Task]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Scores `[N, C]` (float32, CPU) and labels `[N]` of `call` on the whole test data of every task that has it."""
    results = {}
    with torch.no_grad():
        for task in tasks:
            if task.test_data is None:
                continue
            scores, labels = [], []
            for batch, batch_labels in task.test_data:
                scores.append(task.logits(call, batch).float().cpu())
                labels.append(batch_labels.cpu())
            if not scores or sum(y.numel() for y in labels) == 0:
                raise ValueError(f"task {task.name!r}: its test data is empty")
            results[task.name] = (torch.cat(scores), torch.cat(labels))
    return results


def task_metric(task: Task, scores: torch.Tensor, labels: torch.Tensor) -> float:
    """The task's own `metric`, else accuracy."""
    if task.metric is not None:
        return float(task.metric(scores, labels))
    return float((scores.argmax(dim=-1) == labels).double().mean())


def largest_class_share(scores: torch.Tensor) -> float:
    """The fraction of examples predicted as the most predicted class: 1.0 when a model answers one class for
    everything (the collapse entropy minimisation can drive a task into)."""
    return float(scores.argmax(dim=-1).bincount().max()) / scores.shape[0]


def evaluate_tasks(call: ModelCall, tasks: Iterable[Task]) -> dict[str, float]:
    """Test accuracy (or the task's own `metric`) of `call` (a model, or merged parameters bound to one) on
    every task with test data."""
    return evaluate_with_class_shares(call, tasks)[0]


def evaluate_with_class_shares(call: ModelCall, tasks: Iterable[Task]) -> tuple[dict[str, float], dict[str, float]]:
    """`evaluate_tasks` and, from the same predictions, each task's `largest_class_share`."""
    tasks = list(tasks)
    by_name = {task.name: task for task in tasks}
    predictions = task_predictions(call, tasks)
    return ({name: task_metric(by_name[name], *result) for name, result in predictions.items()},
            {name: largest_class_share(scores) for name, (scores, _) in predictions.items()})
