"""Smoke test of benchmarks/bench_data_merges.py in its --quick form: the JSON's structure, sizes and memory
figures that follow from the tower's shapes, and MaTS's CG residuals re-derived from the kept files."""

from __future__ import annotations

import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pyfuse.stats import Statistics  # noqa: E402

from .bench_helpers import load_benchmark  # noqa: E402

HIDDEN, INTERMEDIATE, LAYERS, TASKS, PATCHES = 256, 1024, 4, 3, 50  # --quick: 224 / 32 = 7, 7 * 7 + 1 tokens
BATCHES, BATCH_SIZE, CG_ITERATIONS, REPEATS = 2, 4, 8, 1
MERGES = ["task_arithmetic", "ties", "fisher", "regmean", "mats[regmean]", "mats[kfac]", "mats[diagonal_fisher]",
          "esm", "esm++"]
MIB = 2**20


def _load_bench():
    return load_benchmark("bench_data_merges")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    out = root / "bench.json"
    results = _load_bench().main(["--quick", "--no-progress", "--repeats", str(REPEATS), "--batches", str(BATCHES),
                                  "--batch-size",
                                  str(BATCH_SIZE), "--cg-iterations", str(CG_ITERATIONS), "--workdir",
                                  str(root / "work"), "--json", str(out)])
    return results, json.loads(out.read_text()), root / "work"


def _linear_shapes() -> list[tuple[int, int]]:
    """[out, in] of every Linear of the quick tower: q, k, v, out projections, fc1, fc2 per layer."""
    per_layer = [(HIDDEN, HIDDEN)] * 4 + [(INTERMEDIATE, HIDDEN), (HIDDEN, INTERMEDIATE)]
    return per_layer * LAYERS


def _parameters() -> int:
    per_layer = 4 * (HIDDEN * HIDDEN + HIDDEN) + 2 * 2 * HIDDEN + 2 * HIDDEN * INTERMEDIATE + INTERMEDIATE + HIDDEN
    embeddings = HIDDEN + HIDDEN * 3 * 32 * 32 + PATCHES * HIDDEN
    return embeddings + 2 * HIDDEN + LAYERS * per_layer + 2 * HIDDEN  # + pre- and post-layernorm


def test_json_is_the_returned_results_with_every_part(run):
    results, written, _ = run
    assert written == results
    assert {"provenance", "load", "config", "model", "statistics", "merges", "cg"} <= set(written)
    assert {"command", "commit", "date", "cpu_model", "cores", "threads", "torch", "load_average"} <= set(
        written["provenance"])
    assert written["load"]["load_before"] >= 0 and written["load"]["load_after"] >= 0
    assert written["provenance"]["command"].startswith("python benchmarks/bench_data_merges.py --quick")
    assert written["model"]["parameters"] == _parameters()
    assert written["model"]["layers"] == LAYERS and written["config"]["tasks"] == TASKS


def test_statistics_rows_and_their_stored_sizes(run):
    _, results, _ = run
    rows = {row["kind"]: row for row in results["statistics"]}
    assert list(rows) == ["gram_in", "gram_out", "fisher", "acts"]
    rows_seen = min(512, BATCHES * BATCH_SIZE * PATCHES)  # acts keeps at most max_rows=512 rows
    expected = {  # float32 payload per task, from the shapes alone
        "gram_in": sum(i * i for _, i in _linear_shapes()) * 4,
        "gram_out": sum(o * o for o, _ in _linear_shapes()) * 4,
        "fisher": _parameters() * 4,
        "acts": sum(rows_seen * i for _, i in _linear_shapes()) * 4,
    }
    for kind, row in rows.items():
        assert row["tasks"] == TASKS and len(row["per_task"]) == TASKS
        for record in row["per_task"]:
            assert record["seconds"] > 0 and record["cpu_seconds"] > 0
            assert record["peak_mib"] >= record["baseline_mib"] > 0
            assert record["extra_mib"] == pytest.approx(record["peak_mib"] - record["baseline_mib"])
            payload = record["stored_mib"] * MIB
            assert expected[kind] <= payload < expected[kind] + 64 * 1024, kind  # + the safetensors header
        assert row["total_seconds"] == pytest.approx(sum(r["seconds"] for r in row["per_task"]))
        assert sorted(row["timing"]["samples"]) == sorted(r["seconds"] for r in row["per_task"])


def test_every_merge_is_measured(run):
    _, results, _ = run
    rows = results["merges"]
    assert [row["merge"] for row in rows] == MERGES
    for row in rows:
        assert row["seconds"] > 0 and row["peak_mib"] >= row["baseline_mib"] > 0
        samples = row["timing"]["samples"]  # the timed runs after the measured first one
        assert len(samples) == REPEATS and row["seconds"] == row["timing"]["median"] == samples[0]
        assert row["extra_mib"] == pytest.approx(row["peak_mib"] - row["baseline_mib"])
        assert row["output_mib"] == pytest.approx(_parameters() * 4 / MIB)  # every merged tensor is fp32
    mats = {row["merge"]: row for row in rows if row["method"] == "mats"}
    for row in mats.values():  # one encoder layer solved: its 6 Linear weights
        assert row["solved_tensors"] == 6 and row["parameters"]["iterations"] == results["mats_iterations"]
    assert mats["mats[diagonal_fisher]"]["max_relative_residual"] < 1e-12  # a diagonal system: exact in one step
    esm = {row["merge"]: row for row in rows if row["method"].startswith("esm")}
    assert all(row["esm_tensors"] == 6 * LAYERS and row["alpha"] == 1.0 for row in esm.values())
    assert esm["esm++"]["experts"]["layers"] == 6 * LAYERS


def _regularised(gram: torch.Tensor) -> torch.Tensor:
    return 0.9 * gram + 0.1 * torch.diag(torch.diagonal(gram))


def test_cg_residuals_decrease_and_start_where_mats_starts(run):
    _, results, work = run
    rows = results["cg"]
    middle = LAYERS // 2
    tensors = [f"encoder.layers.{middle}.self_attn.out_proj.weight", f"encoder.layers.{middle}.mlp.fc2.weight"]
    assert [(row["tensor"], row["objective"]) for row in rows] == [(t, o) for t in tensors for o in ("regmean", "kfac")]
    from safetensors.torch import load_file

    base = load_file(work / "base.safetensors")
    models = [load_file(work / f"task{t}.safetensors") for t in range(TASKS)]
    for row in rows:
        assert [p["iteration"] for p in row["residuals"]] == [0, 1, 2, 4, 8]
        residuals = [p["residual"] for p in row["residuals"]]
        assert residuals[-1] < 0.7 * residuals[0], row
        # step 0 re-derived in float64: x0 = task arithmetic (0.3), Grams 0.9 G + 0.1 diag(G), unweighted sums
        name = row["tensor"]
        b = base[name].double()
        thetas = [m[name].double() for m in models]
        x0 = b + 0.3 * sum(t - b for t in thetas)
        grams_in = [_regularised(Statistics.load(work / f"statistics_task{t}_gram_in.safetensors")
                                 .get("gram_in", name).double()) for t in range(TASKS)]
        if row["objective"] == "regmean":
            rhs = sum(t @ g for t, g in zip(thetas, grams_in))
            applied = x0 @ sum(grams_in)
        else:
            grams_out = [_regularised(Statistics.load(work / f"statistics_task{t}_gram_out.safetensors")
                                      .get("gram_out", name).double()) for t in range(TASKS)]
            rhs = sum(s @ t @ a for s, t, a in zip(grams_out, thetas, grams_in))
            applied = sum(s @ x0 @ a for s, a in zip(grams_out, grams_in))
        assert residuals[0] == pytest.approx(float((rhs - applied).norm()), rel=1e-9)
        assert row["rhs_norm"] == pytest.approx(float(rhs.norm()), rel=1e-9)
        assert row["residuals"][-1]["relative"] == pytest.approx(residuals[-1] / float(rhs.norm()), rel=1e-9)


def test_bad_options_fail_before_any_work(tmp_path, capsys):
    bench = _load_bench()
    work = tmp_path / "work"
    for argv, message in ((["--kinds", "acts", "--merges", "fisher"], "fisher needs fisher statistics"),
                          (["--cg-tensors", "encoder.layers.0.mlp.fc9.weight"], "fc9"),
                          (["--mats-layers", "5"], "--mats-layers must be 'all' or 1..4"),
                          (["--kinds", "gram_in,hessian"], "--kinds")):
        with pytest.raises(SystemExit):
            bench.main(["--quick", "--workdir", str(work), *argv])
        assert message in capsys.readouterr().err
        assert not work.exists()


def test_embedded_run_writes_its_json(tmp_path, monkeypatch):
    """`--embedded --json F` (the demo's data-aware rows) at a tiny size: the JSON is written, holding the demo's
    report (rows, settings, its provenance) and the seeds asked for."""
    import pyfuse.demo
    from pyfuse.data.embedded import load_embedded_tasks
    from pyfuse.finetune import FinetuneConfig

    from .text_helpers import tiny_encoder_dir

    tasks = ("tweet_sentiment", "definition_pos")
    texts = [text for task in load_embedded_tasks() for text in
             (*task.train_texts, *task.test_texts, *task.class_descriptions)]
    encoder = tiny_encoder_dir(tmp_path / "encoder", texts, hidden=16)
    real = pyfuse.demo.DemoSettings

    def tiny(**chosen):
        return real(tasks=tasks, test_limit=40, stats_examples=16, validation_examples=8, encoder=str(encoder),
                    finetune=FinetuneConfig(steps=4, batch_size=16, lr=3e-3, warmup=0.0), **chosen)

    monkeypatch.setattr(pyfuse.demo, "DemoSettings", tiny)
    monkeypatch.setenv("PYFUSE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "embedded.json"
    results = _load_bench().main(["--embedded", "--no-progress", "--seeds", "0,1", "--workdir",
                                  str(tmp_path / "work"), "--json", str(out)])
    written = json.loads(out.read_text())
    assert written == json.loads(json.dumps(results))
    embedded = written["embedded"]
    assert [t["name"] for t in embedded["tasks"]] == list(tasks) and embedded["seeds"] == [0, 1]
    assert written["seeds"] == {"merges": [0, 1]}
    methods = [row["method"] for row in embedded["rows"]]
    assert methods[:4] == ["individual", "pretrained", "task_arithmetic", "ties"]
    assert set(pyfuse.demo.DATA_METHODS) <= set(methods)
    assert {"commit", "date", "cpu_model"} <= set(embedded["provenance"]) and "provenance" in written
