"""Checkpoints: an interrupted run leaves its last checkpoint intact, and resuming it reproduces the
uninterrupted run bit for bit (flat parameters, logits, coefficients, curves)."""

from __future__ import annotations

import pytest
import torch

import pyfuse
from pyfuse.adaptive import RunOptions
from pyfuse.adaptive.checkpoint import load_checkpoint

from .adaptive_helpers import digits_problem, digits_task


class Interrupting:
    """A task's batches that raise KeyboardInterrupt (as Ctrl-C would) when the `at`-th batch is drawn."""

    def __init__(self, batches: list, at: int):
        self.batches, self.at, self.drawn = batches, at, 0

    def __iter__(self):
        for batch in self.batches:
            self.drawn += 1
            if self.drawn == self.at:
                raise KeyboardInterrupt
            yield batch


def _run(out_dir, *, resume=False, interrupt_at=None, mask_lr=0.05):
    model, tv, tasks = digits_problem()
    if interrupt_at is not None:
        tasks[1] = digits_task(tasks[1].name, batches=Interrupting(list(tasks[1].batches), interrupt_at))
    options = RunOptions(out_dir=out_dir, resume=resume, checkpoint_every=2, eval_every=2, progress=False,
                         backend="reference")
    return pyfuse.concrete_adamerging(model, tv, tasks, granularity="layer", meta_steps=4, adamerging_steps=3,
                                      mask_lr=mask_lr, lr=0.01, eval_mask="relaxed", seed=7, options=options)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("full"))


# A meta step draws two batches per task, an adapt step one; checkpoints follow steps 2, 4 and 6.
@pytest.mark.parametrize("interrupt_at, last_checkpoint", [(7, 2), (10, 4), (11, 6)])
def test_resume_reproduces_the_uninterrupted_run(tmp_path, uninterrupted, interrupt_at, last_checkpoint):
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, interrupt_at=interrupt_at)
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["step"] == last_checkpoint
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]  # no temp files, no partial outputs

    resumed = _run(tmp_path, resume=True)
    assert resumed.report["resumed_from"] == last_checkpoint
    assert torch.equal(resumed.flat, uninterrupted.flat)
    assert torch.equal(resumed.logits, uninterrupted.logits)
    assert torch.equal(resumed.coefficients, uninterrupted.coefficients)
    for key in ("entropy", "accuracy", "final_accuracy"):
        assert resumed.report[key] == uninterrupted.report[key]


def test_checkpoint_holds_the_whole_state(uninterrupted, tmp_path_factory):
    out = tmp_path_factory.mktemp("again")
    again = _run(out)
    assert torch.equal(again.flat, uninterrupted.flat)  # deterministic for a seed and backend
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["step"] == 7 and state["seed"] == 7
    assert set(state["optimizers"]) == {"mask", "inner", "adapt"}
    assert torch.equal(state["logits"], again.logits)
    assert state["drawn"] == {"low": 11, "high": 11, "even": 11}


def test_resume_refuses_a_different_run(tmp_path):
    _run(tmp_path)
    with pytest.raises(ValueError, match="mask_lr"):
        _run(tmp_path, resume=True, mask_lr=0.1)


def test_resume_without_a_checkpoint_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        _run(tmp_path, resume=True)


def test_interrupt_while_writing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    _run(tmp_path)
    before = (tmp_path / "checkpoint.pt").read_bytes()

    def interrupted_save(obj, path):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path)
    assert (tmp_path / "checkpoint.pt").read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]

