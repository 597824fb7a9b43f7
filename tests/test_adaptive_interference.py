"""A constructed interference problem: two tasks whose task vectors write large junk weights on the other
task's head, on input features that are pure noise in that task's data. Task arithmetic suffers; the
Concrete mask learned from unlabeled entropy alone must drop exactly those coordinates."""

from __future__ import annotations

import torch

import pyfuse
from pyfuse.adaptive import RunOptions

D_IN, NOISE, N, SIGNAL = 18, 16, 256, 3.0
QUIET = RunOptions(progress=False, backend="reference")


def _problem():
    generator = torch.Generator().manual_seed(0)

    def data(signal_dim: int):
        y = torch.randint(0, 2, (N,), generator=generator)
        x = torch.zeros(N, D_IN)
        x[:, signal_dim] = (2 * y - 1).float() + 0.3 * torch.randn(N, generator=generator)
        x[:, 2:] = torch.randn(N, NOISE, generator=generator)
        return x, y

    (xa, ya), (xb, yb) = data(0), data(1)
    # logits 0:2 are task a's, 2:4 task b's; input 0 carries a's label, input 1 b's, inputs 2: are noise
    tau_a, tau_b = torch.zeros(4, D_IN), torch.zeros(4, D_IN)
    tau_a[0, 0], tau_a[1, 0] = -SIGNAL, SIGNAL
    tau_b[2, 1], tau_b[3, 1] = -SIGNAL, SIGNAL
    tau_a[2:4, 2:] = torch.randn(2, NOISE, generator=generator).sign()  # a's junk, on b's head
    tau_b[0:2, 2:] = torch.randn(2, NOISE, generator=generator).sign()  # b's junk, on a's head
    conflicting = torch.zeros(4, D_IN, dtype=torch.bool)
    conflicting[:, 2:] = True
    useful = (tau_a + tau_b != 0) & ~conflicting

    def task(name, x, y, rows):
        batches = [x[i:i + 16] for i in range(0, N, 16)]
        return pyfuse.Task(name, batches, lambda call, b: call(b)[:, rows], test_data=[(x, y)])

    base = {"weight": torch.zeros(4, D_IN)}
    tv = pyfuse.TaskVectors.from_models(base, [{"weight": tau_a}, {"weight": tau_b}], names=["a", "b"])
    tasks = [task("a", xa, ya, slice(0, 2)), task("b", xb, yb, slice(2, 4))]
    return torch.nn.Linear(D_IN, 4, bias=False), tv, tasks, conflicting.flatten(), useful.flatten()


def test_learned_mask_drops_conflicting_coordinates_and_beats_task_arithmetic():
    model, tv, tasks, conflicting, useful = _problem()
    task_arithmetic = pyfuse.adamerging(model, tv, tasks, granularity="task", steps=0, options=QUIET)
    assert torch.equal(task_arithmetic.coefficients, torch.full((2,), 0.3))
    ta_accuracy = task_arithmetic.report["final_average"]
    assert ta_accuracy < 0.9  # the junk really interferes

    result = pyfuse.concrete_task_arithmetic(model, tv, tasks, steps=100, mask_lr=0.05, eval_mask="threshold",
                                             options=QUIET)
    logits = result.logits
    assert (logits[conflicting] < 0).all(), "every conflicting coordinate is dropped"
    assert (logits[useful] > 0).all(), "every useful coordinate is kept"
    assert result.report["final_average"] > ta_accuracy + 0.1
    assert result.report["final_average"] > 0.97
