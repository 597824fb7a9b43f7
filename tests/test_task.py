"""`Task`, its batch stream and the entropy loss, against closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from pyfuse.task import BatchStream, Task, entropy_loss


def test_entropy_loss_closed_forms():
    # uniform predictions over C classes: log C (up to the 1e-8 inside the log)
    assert entropy_loss(torch.zeros(4, 10)).item() == pytest.approx(math.log(10), abs=1e-6)
    # a two-class batch with p = (0.8, 0.2) and (0.5, 0.5): the mean of the two entropies
    logits = torch.tensor([[math.log(4.0), 0.0], [0.0, 0.0]])
    expected = (-(0.8 * math.log(0.8) + 0.2 * math.log(0.2)) + math.log(2)) / 2
    assert entropy_loss(logits).item() == pytest.approx(expected, abs=1e-6)
    with pytest.raises(ValueError, match=r"\[B, C\]"):
        entropy_loss(torch.zeros(10))


def test_batch_stream_cycles_and_counts():
    stream = BatchStream(Task("t", [1, 2, 3], lambda call, b: b))
    assert [stream.next() for _ in range(7)] == [1, 2, 3, 1, 2, 3, 1]
    assert stream.drawn == 7
    resumed = BatchStream(Task("t", [1, 2, 3], lambda call, b: b))
    resumed.skip_to(7)
    assert resumed.next() == stream.next() == 2


def test_one_shot_iterators_cannot_cycle():
    stream = BatchStream(Task("t", iter([1, 2]), lambda call, b: b))
    assert [stream.next(), stream.next()] == [1, 2]
    with pytest.raises(ValueError, match="one-shot iterator"):
        stream.next()


def test_task_checks_its_fields():
    with pytest.raises(ValueError, match="name"):
        Task("", [1], lambda call, b: b)
    with pytest.raises(TypeError, match="'t': batches"):
        Task("t", 3, lambda call, b: b)
    with pytest.raises(TypeError, match="'t': logits"):
        Task("t", [1], None)


def test_evaluate_tasks_uses_a_tasks_metric_over_the_whole_test_set():
    import torch

    from pyfuse.adaptive import Task, evaluate_tasks

    scores = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4], [0.45, 0.55]])
    labels = torch.tensor([1, 0, 0, 0, 1])
    test_data = [(scores[:2], labels[:2]), (scores[2:], labels[2:])]  # the "batch" is the scores themselves
    seen = []

    def metric(all_scores, all_labels):
        seen.append((all_scores.clone(), all_labels.clone()))
        return 0.25

    plain = Task("t", [scores], lambda call, batch: call(batch), test_data)
    assert evaluate_tasks(lambda x: x, [plain]) == {"t": 4 / 5}
    custom = Task("t", [scores], lambda call, batch: call(batch), test_data, metric=metric)
    assert evaluate_tasks(lambda x: x, [custom]) == {"t": 0.25}
    assert torch.equal(seen[0][0], scores) and torch.equal(seen[0][1], labels)
