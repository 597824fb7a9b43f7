"""The bi-level loop across 2 gloo processes (`torch.multiprocessing.spawn`), one task per rank, against one process.

Both runs take the same steps. In general the distributed run adds the tasks' gradients in another order
(float32 reassociation); with two tasks on two ranks the all-reduced sum is `g1 + g2`, the one addition the
single process makes too, so the learned logits, coefficients and merged parameters are bit-identical. The
entropies travel in the float32 gradient buffer: equal to 1e-6 relative.
"""

from __future__ import annotations

import pytest
import torch

import pyfuse
from pyfuse.adaptive import RunOptions
from pyfuse.adaptive.checkpoint import load_checkpoint

from .adaptive_helpers import digits_models, digits_task, mlp
from .dist_helpers import run_alone, run_ranks
from .test_adaptive_resume import Interrupting

TASKS = ("low", "high")


def _concrete_am(out_dir: str | None, resume: bool = False, interrupt_at: int | None = None):
    base, finetuned = digits_models()
    tv = pyfuse.TaskVectors.from_models(base, finetuned[:2], names=list(TASKS))
    model = mlp()
    model.load_state_dict(base)
    tasks = [digits_task(name) for name in TASKS]
    if interrupt_at is not None:
        tasks = [digits_task(t.name, batches=Interrupting(list(t.batches), interrupt_at)) for t in tasks]
    options = RunOptions(out_dir=out_dir, resume=resume, checkpoint_every=2, progress=False, backend="reference")
    result = pyfuse.concrete_adamerging(model, tv, tasks, granularity="layer", meta_steps=3, adamerging_steps=2,
                                        mask_lr=0.05, lr=0.01, eval_mask="relaxed", seed=3, options=options)
    return {"flat": result.flat, "logits": result.logits, "coefficients": result.coefficients,
            "report": result.report}


def _interrupted_then_resumed(out_dir: str):
    """A run interrupted in step 4 (every task's 7th batch: a meta step draws 2, an adapt step 1) after its
    checkpoint at step 2, then resumed to the end."""
    try:
        _concrete_am(out_dir, interrupt_at=7)
    except KeyboardInterrupt:
        return _concrete_am(out_dir, resume=True)
    raise AssertionError("the run was not interrupted")


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    return run_alone(tmp_path_factory.mktemp("alone"), _concrete_am, None)


def _same(a: dict, b: dict) -> None:
    # float32 reduction order (gloo's sum of the ranks' gradients, autograd's of the tasks'): the bound stated
    # in the README; both sides run in fresh processes (in the suite's own process the reference once differed)
    for key in ("flat", "logits", "coefficients"):
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    assert a["report"]["entropy"]["step"] == b["report"]["entropy"]["step"]
    assert a["report"]["entropy"]["value"] == pytest.approx(b["report"]["entropy"]["value"], rel=1e-6)


def test_two_ranks_match_one_process_and_resume(one_process, tmp_path):
    ranks = run_ranks(tmp_path, _interrupted_then_resumed, str(tmp_path / "out"))
    for result in ranks:
        _same(result, one_process)
        assert result["report"]["distributed"] == {"world_size": 2, "backend": "gloo"}
        assert result["report"]["resumed_from"] == 2  # the 3-step run's last checkpoint before its final one
    assert torch.equal(ranks[0]["flat"], ranks[1]["flat"])  # every rank takes the same steps
    state = load_checkpoint(tmp_path / "out" / "checkpoint.pt")
    assert state["fingerprint"]["world_size"] == 2 and set(state["drawn"]) == set(TASKS)
    with pytest.raises(ValueError, match="world_size"):  # one process cannot resume a 2-process run
        _concrete_am(str(tmp_path / "out"), resume=True)
