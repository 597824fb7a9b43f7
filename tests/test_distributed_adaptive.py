"""The bi-level loop across 2 gloo processes (`torch.multiprocessing.spawn`), one task and one shard of the flat
buffer per rank, against one process.

Both runs take the same steps. The distributed run adds in other orders (gloo's sum of the ranks' gradients,
the coefficients' gradients summed per shard then over ranks): float32 reassociation, within rtol 1e-5 and
atol 1e-6 (the bound the README states). The entropies travel in the float32 gradient buffer: equal to 1e-6
relative. A resumed 2-rank run is bit-identical to the uninterrupted 2-rank run.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import pyfuse
from pyfuse.adaptive import RunOptions
from pyfuse.adaptive.checkpoint import load_checkpoint
from pyfuse.distributed import RankFailed

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


def _uninterrupted_and_resumed(tmp: str):
    """The run uninterrupted, and the run interrupted in step 4 (every task's 7th batch: a meta step draws 2, an
    adapt step 1) after its checkpoint at step 2, then resumed to the end."""
    uninterrupted = _concrete_am(f"{tmp}/plain")
    try:
        _concrete_am(f"{tmp}/out", interrupt_at=7)
    except KeyboardInterrupt:
        return uninterrupted, _concrete_am(f"{tmp}/out", resume=True)
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
    ranks = run_ranks(tmp_path, _uninterrupted_and_resumed, str(tmp_path))
    for uninterrupted, resumed in ranks:
        _same(uninterrupted, one_process)
        assert resumed["report"]["resumed_from"] == 2  # the 3-step run's last checkpoint before its final one
        for key in ("flat", "logits", "coefficients"):
            assert torch.equal(resumed[key], uninterrupted[key]), key
        assert resumed["report"]["entropy"] == uninterrupted["report"]["entropy"]
    assert torch.equal(ranks[0][1]["flat"], ranks[1][1]["flat"])  # every rank takes the same steps
    # each rank holds the task vectors of its own run of whole segments, balanced by bytes
    sizes = pyfuse.TaskVectors.from_models(*digits_models()).layout.sizes
    distributed = ranks[0][1]["report"]["distributed"]
    assert distributed["world_size"] == 2 and distributed["backend"] == "gloo"
    shards = distributed["shards"]
    assert [s["rank"] for s in shards] == [0, 1] and [s["segments"] for s in shards] == [[0, 2], [2, len(sizes)]]
    assert sum(s["elements"] for s in shards) == sum(sizes)
    for shard in shards:
        first, last = shard["segments"]
        assert shard["elements"] == sum(sizes[first:last])
        assert abs(shard["elements"] - sum(sizes) / 2) <= max(sizes)  # whole segments: off by at most one
        assert shard["task_vector_bytes"] == len(TASKS) * shard["elements"] * 4  # fp32, this shard only
    # the checkpoint has the one-process format: the logits and their Adam moments whole
    state = load_checkpoint(tmp_path / "out" / "checkpoint.pt")
    assert state["fingerprint"]["world_size"] == 2 and set(state["drawn"]) == set(TASKS)
    assert state["logits"].shape == (sum(sizes),)
    assert torch.equal(state["logits"], ranks[0][1]["logits"])
    assert {m.shape for m in state["optimizers"]["mask"]["state"][0].values() if m.dim()} == {(sum(sizes),)}
    with pytest.raises(ValueError, match="world_size"):  # one process cannot resume a 2-process run
        _concrete_am(str(tmp_path / "out"), resume=True)


def _from_config(config: dict, out_dir: str) -> dict:
    from pyfuse.config import run_from_config

    result = run_from_config(config, out_dir, trust_code=True)
    return {"flat": result.flat, "logits": result.logits, "coefficients": result.coefficients,
            "report": result.report}


def _save_digits_models(root: str) -> None:
    base, finetuned = digits_models()
    save_file(base, f"{root}/base.safetensors")
    for name, state in zip(TASKS, finetuned):
        save_file(state, f"{root}/{name}.safetensors")


def test_a_config_run_on_two_ranks_loads_each_rank_its_shard(one_process, tmp_path, disk_path):
    # the models are trained in a fresh process, as the reference's are (the suite's own may differ in the bits)
    run_alone(tmp_path, _save_digits_models, str(tmp_path))
    config = {
        "method": "concrete_adamerging", "base": str(tmp_path / "base.safetensors"),
        "models": {name: str(tmp_path / f"{name}.safetensors") for name in TASKS},
        "architecture": "tests.adaptive_helpers:digits_architecture",
        "tasks": {name: {"factory": "tests.adaptive_helpers:digits_task", "kwargs": {"name": name}} for name in TASKS},
        "parameters": {"granularity": "layer", "meta_steps": 3, "adamerging_steps": 2, "mask_lr": 0.05, "lr": 0.01,
                       "eval_mask": "relaxed", "seed": 3},
        # each rank's shard of the base and task vectors goes straight into disk-backed buffers
        "run": {"progress": False, "backend": "reference", "base_on_disk": True, "vectors_on_disk": True},
    }
    ranks = run_ranks(tmp_path, _from_config, config, str(disk_path / "out"))
    for result in ranks:
        _same(result, one_process)
    shards = ranks[0]["report"]["distributed"]["shards"]
    # read from the files, each rank's task vectors hold its segments only (fp32: 4 bytes an element)
    assert [s["task_vector_bytes"] for s in shards] == [len(TASKS) * s["elements"] * 4 for s in shards]
    assert sum(s["elements"] for s in shards) == one_process["flat"].numel()


def _failing_on_rank_1(out_dir: str) -> dict:
    """The run with task "high" raising on rank 1 only: every rank's error, and whether `out_dir` was made."""
    base, finetuned = digits_models()
    tv = pyfuse.TaskVectors.from_models(base, finetuned[:2], names=list(TASKS))
    model = mlp()
    high = digits_task("high")

    def logits(call, inputs):
        if torch.distributed.get_rank() == 1:
            raise ValueError("task high broke on rank 1")
        return high.logits(call, inputs)

    tasks = [digits_task("low"), pyfuse.Task("high", high.batches, logits, test_data=high.test_data)]
    options = RunOptions(out_dir=out_dir, checkpoint_every=1, progress=False, backend="reference")
    try:
        pyfuse.concrete_adamerging(model, tv, tasks, meta_steps=2, adamerging_steps=1, eval_mask="relaxed",
                                   options=options)
    except Exception as err:
        return {"error": f"{type(err).__name__}: {err}", "out_dir": Path(out_dir).exists()}
    return {"error": None, "out_dir": Path(out_dir).exists()}


def test_an_error_on_one_rank_fails_every_rank_and_writes_nothing(tmp_path):
    rank0, rank1 = run_ranks(tmp_path, _failing_on_rank_1, str(tmp_path / "out"))
    assert rank1["error"] == "ValueError: task high broke on rank 1"
    assert rank0["error"] == f"{RankFailed.__name__}: rank 1 of 2 failed: ValueError: task high broke on rank 1"
    assert not rank0["out_dir"] and not rank1["out_dir"]


def test_a_rank_loads_only_its_shard_of_the_task_vectors():
    # six tensors of 100 elements and an integer buffer: two ranks hold 300 elements each, 1/2 of the bytes
    gen = torch.Generator().manual_seed(0)
    base = {f"t{i}": torch.randn(10, 10, generator=gen) for i in range(6)} | {"ids": torch.arange(4)}
    tuned = [{k: v + torch.randn(v.shape, generator=gen) if v.is_floating_point() else v for k, v in base.items()}
             for _ in range(3)]
    whole = pyfuse.TaskVectors.from_models(base, tuned)
    shards = [pyfuse.TaskVectors.from_models(base, tuned, shard_of=(rank, 2)) for rank in range(2)]
    assert [s.segments for s in shards] == [(0, 3), (3, 6)] and [s.span for s in shards] == [(0, 300), (300, 600)]
    assert [s.nbytes for s in shards] == [whole.nbytes // 2] * 2
    assert torch.equal(torch.cat([s.vectors for s in shards], 1), whole.vectors)
    assert torch.equal(torch.cat([s.base for s in shards]), whole.base)
    for s in shards:
        assert torch.equal(s.carried["ids"], base["ids"])
        copied = whole.sharded(*s.segments)  # what a rank copies out of whole task vectors
        assert torch.equal(copied.vectors, s.vectors) and copied.vectors.untyped_storage().nbytes() == s.nbytes
    with pytest.raises(ValueError, match=r"shard of segments \[0, 3\]"):
        shards[0].sharded(3, 6)
    with pytest.raises(ValueError, match="needs the whole task vectors"):
        shards[0].task_state_dict(0)
