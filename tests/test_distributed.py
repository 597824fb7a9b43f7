"""Merges across 2 gloo processes (`torch.multiprocessing.spawn`, and `torchrun` for the CLI) against one process.

The tensors must be bit-identical to a one-process merge: TIES' whole-model thresholds come from histograms
summed over the ranks (one process selects these small models directly, without histograms), DARE's drop is
indexed by the global flat position, and the data-aware methods merge each rank's parameters in full.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

import pyfuse
from pyfuse.engine.distributed import rank_starts
from pyfuse.merge import plan_merge

from .dist_helpers import merge_jobs, rank_threads, run_ranks
from .merge_helpers import load_dir, save_family, tiny_llama
from .stats_helpers import TokenMLP, mlp_batches, mlp_logits, perturbed

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Inputs, and every distributed merge of this module run in one 2-process group (spawning is slow)."""
    tmp = tmp_path_factory.mktemp("dist")
    base_dir, dirs, _, _ = save_family(tiny_llama, tmp / "llama")
    llama = {"base": str(base_dir), "finetuned": [str(d) for d in dirs], "shard_size": "50KB"}

    mlp = TokenMLP()
    save_file({k: v.contiguous() for k, v in mlp.state_dict().items()}, str(tmp / "mlp.safetensors"))
    models, stats = [], []
    for i in range(2):
        tuned = perturbed(mlp, 0.1, seed=i)
        save_file(tuned, str(tmp / f"mlp{i}.safetensors"))
        model_i = TokenMLP()
        model_i.load_state_dict(tuned)
        pyfuse.collect_statistics(model_i, mlp_batches(seed=i), mlp_logits, kinds=("gram_in", "fisher", "acts"),
                                  progress=False).save(tmp / f"stats{i}.safetensors")
        models.append(str(tmp / f"mlp{i}.safetensors"))
        stats.append(str(tmp / f"stats{i}.safetensors"))
    data = {"base": str(tmp / "mlp.safetensors"), "finetuned": models, "statistics": stats}

    # a NaN in a tensor that only rank 1 reads (the output tensors are split in order, balanced by bytes)
    plan = plan_merge("task_arithmetic", llama["base"], llama["finetuned"])
    starts = rank_starts(plan, 2)
    poisoned_name = plan.outputs[starts[2] - 1][0]
    poisoned = load_dir(dirs[1])
    poisoned[poisoned_name] = poisoned[poisoned_name].clone()
    poisoned[poisoned_name].view(-1)[3] = float("nan")
    save_file(poisoned, str(tmp / "poisoned.safetensors"))

    cases = {
        "ties": dict(method="ties", **llama, density=0.3),
        "dare": dict(method="dare", **llama, p=0.4, seed=7, then="ties", density=0.5),
        "regmean": dict(method="regmean", **data, alpha=0.8),
        "fisher": dict(method="fisher", **data, normalize="l2"),
        "mats": dict(method="mats", **data, objective="diagonal_fisher", iterations=5),
        "esm": dict(method="esm", **data),
        "nan": dict(method="task_arithmetic", base=llama["base"], finetuned=[llama["finetuned"][0],
                                                                              str(tmp / "poisoned.safetensors")]),
    }
    jobs = [(name, {**kwargs, "out_dir": str(tmp / name)}) for name, kwargs in cases.items()]
    ranks = run_ranks(tmp, merge_jobs, jobs)
    return tmp, cases, {name: [outcome[name] for outcome in ranks] for name in cases}, poisoned_name


def _one_process(kwargs: dict) -> dict[str, torch.Tensor]:
    kwargs = {k: v for k, v in kwargs.items() if k != "shard_size"}
    with rank_threads():
        return pyfuse.merge(kwargs.pop("method"), kwargs.pop("base"), kwargs.pop("finetuned"), **kwargs)


def _check_identical(tmp: Path, name: str, expected: dict[str, torch.Tensor]) -> dict:
    merged = load_dir(tmp / name)
    assert merged.keys() == expected.keys()
    for key in expected:
        assert merged[key].dtype == expected[key].dtype
        assert torch.equal(merged[key], expected[key]), f"{name}: {key} differs from the one-process merge"
    return json.loads((tmp / name / "merge_report.json").read_text())


@pytest.mark.parametrize("name", ["ties", "dare", "regmean", "fisher", "mats"])
def test_two_ranks_match_one_process_bit_for_bit(setup, name):
    tmp, cases, outcomes, _ = setup
    assert all("report" in outcome for outcome in outcomes[name]), outcomes[name]
    report = _check_identical(tmp, name, _one_process(cases[name]))
    assert outcomes[name][0]["report"] == outcomes[name][1]["report"] == report  # every rank returns it
    info = report["distributed"]
    assert info["world_size"] == 2 and info["backend"] == "gloo"
    assert [entry["rank"] for entry in info["ranks"]] == [0, 1]
    assert all(entry["tensors"] > 0 for entry in info["ranks"])
    assert sum(entry["tensors"] for entry in info["ranks"]) == report["merged_tensors"] + report["carried_tensors"]
    assert all(len(file["sha256"]) == 64 for entry in report["inputs"] for file in entry["files"])


def test_method_results_cover_every_rank(setup):
    """MaTS' per-tensor CG table in the report holds every solved tensor, whichever rank solved it."""
    tmp, cases, outcomes, _ = setup
    report = outcomes["mats"][0]["report"]
    kwargs = {k: v for k, v in cases["mats"].items() if k != "shard_size"}
    plan = plan_merge(kwargs.pop("method"), kwargs.pop("base"), kwargs.pop("finetuned"), **kwargs)
    plan.state_dict()
    assert report["method_result"]["solved"].keys() == plan.method.result["solved"].keys()
    assert len(report["method_result"]["solved"]) >= 2


def test_a_whole_model_data_method_runs_on_rank_0(setup):
    """ESM merges the whole model at once (its own `merge_model`): rank 0 merges and writes it all."""
    tmp, cases, outcomes, _ = setup
    report = _check_identical(tmp, "esm", _one_process(cases["esm"]))
    assert [entry["tensors"] for entry in report["distributed"]["ranks"]] == [4, 0]


def test_ties_ranks_read_only_their_share(setup):
    """Each rank reads its own tensors in each of TIES' 4 passes (2 histogram passes, the sign balance, the
    merge): together, exactly 4 reads of the 3 models, each rank about half."""
    tmp, _, outcomes, _ = setup
    ranks = outcomes["ties"][0]["report"]["distributed"]["ranks"]
    model_bytes = sum(file.stat().st_size for file in (tmp / "llama" / "base").glob("*.safetensors"))
    total = sum(entry["bytes_read"] for entry in ranks)
    assert 4 * 3 * (model_bytes - 4096) < total <= 4 * 3 * model_bytes  # less the files' headers
    assert all(0.3 * total < entry["bytes_read"] < 0.7 * total for entry in ranks)


def test_an_error_on_one_rank_fails_every_rank_and_writes_nothing(setup):
    tmp, _, outcomes, poisoned_name = setup
    first, second = (outcome["error"] for outcome in outcomes["nan"])
    assert "NonFiniteError" in second and poisoned_name in second
    assert first.startswith("RankFailed: rank 1 of 2 failed: NonFiniteError") and poisoned_name in first
    assert not (tmp / "nan").exists()
    assert not [p for p in tmp.iterdir() if p.name.startswith(".nan")]  # no partial directory left


def test_torchrun_cli_merge(setup, tmp_path):
    """`torchrun --nproc-per-node 2 -m pyfuse merge`: one output, the one-process tensors, one summary."""
    _, cases, _, _ = setup
    ties = cases["ties"]
    config = tmp_path / "ties.yaml"
    config.write_text(yaml.safe_dump({"method": "ties", "base": ties["base"], "models": ties["finetuned"],
                                      "parameters": {"density": 0.3}, "shard_size": "50KB"}))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "pyfuse", "merge", str(config), str(tmp_path / "out"), "--no-progress"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("merged 21 tensors") == 1  # rank 0 prints the summary
    report = _check_identical(tmp_path, "out", _one_process(ties))
    assert report["distributed"]["world_size"] == 2


@pytest.mark.parametrize("sizes, parts", [([1] * 10, 3), ([100, 1, 1, 1], 2), ([5, 5], 4), ([3, 9, 2, 7, 7, 1], 3)])
def test_split_by_bytes_is_contiguous_and_within_one_item_of_each_share(sizes, parts):
    from pyfuse.distributed import split_by_bytes

    starts = split_by_bytes(sizes, parts)
    assert len(starts) == parts + 1 and starts[0] == 0 and starts[-1] == len(sizes)
    assert starts == sorted(starts)
    share = sum(sizes) / parts
    for lo, hi in zip(starts, starts[1:]):
        assert abs(sum(sizes[lo:hi]) - share) <= max(sizes)


def test_writer_parts_keep_shards_within_a_part_and_names_global(tmp_path):
    from pyfuse.io.atomic import check_output_dir
    from pyfuse.io.writer import ShardedWriter

    entries = [(f"t{i}", torch.Size([25]), torch.float32) for i in range(5)]  # 100 bytes each
    target = check_output_dir(tmp_path / "out")
    writers = [ShardedWriter(target, entries, 250, [0, 2, 5], part) for part in (0, 1)]
    # part 0: t0 t1 in one shard; part 1: t2 t3 | t4 (250 bytes a shard)
    assert writers[0].shard_names == writers[1].shard_names == [f"model-0000{k}-of-00003.safetensors"
                                                                for k in (1, 2, 3)]
    with writers[0] as first, writers[1] as second:
        second.join(first.path)
        with pytest.raises(RuntimeError, match="planned order"):
            second.write_tensor("t0", [torch.zeros(25)])
        for i in (2, 3, 4):
            second.write_tensor(f"t{i}", [torch.full((25,), float(i))])
        with pytest.raises(RuntimeError, match="only part 0"):
            second.commit()
        for i in (0, 1):
            first.write_tensor(f"t{i}", [torch.full((25,), float(i))])
        first.commit()
    merged = load_dir(tmp_path / "out")
    assert {k: float(v[0]) for k, v in merged.items()} == {f"t{i}": float(i) for i in range(5)}
