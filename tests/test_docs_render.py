"""docs/render.py's benchmark renderers: each benchmark is run here at a tiny size and its JSON rendered; every
figure in the rendered tables is parsed back and must equal the JSON's (to the four significant digits shown),
every ratio appear with its value or as withheld with its reason, and the provenance line name the run's commit,
date and CPU."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from .bench_helpers import load_benchmark
from .test_docs import render

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
TIMING = re.compile(r"^(?P<median>[-0-9.e+]+) (?P<unit>m?s) \((?P<spread>\d+)%\)$")


def run_bench(script: str, tmp_path: Path, *args: str) -> dict:
    """`python benchmarks/SCRIPT --json F ARGS` in a subprocess (one thread each); the JSON it wrote."""
    out = tmp_path / f"{Path(script).stem}.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(BENCH / script), *args, "--json", str(out)], capture_output=True,
                          text=True, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


def tables(markdown: str) -> list[list[dict[str, str]]]:
    """Every markdown table of `markdown`: its rows as {header: cell}."""
    found, lines = [], markdown.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("| ") and i + 1 < len(lines) and lines[i + 1].startswith("| ---"):
            headers = [h.strip() for h in line.strip("|").split(" | ")]
            rows = []
            for row in lines[i + 2:]:
                if not row.startswith("|"):
                    break
                rows.append(dict(zip(headers, (c.strip() for c in row[2:-2].split(" | ")))))
            found.append(rows)
    return found


def assert_number(cell: str, expected: float | None) -> None:
    if expected is None:
        assert cell in ("", "withheld"), cell
        return
    assert float(cell.replace(",", "")) == pytest.approx(expected, rel=1e-3, abs=1e-12), (cell, expected)


def assert_timing(cell: str, summary: dict) -> None:
    match = TIMING.match(cell)
    assert match, cell
    scale = 1e3 if match["unit"] == "ms" else 1.0
    assert float(match["median"]) == pytest.approx(summary["median"] * scale, rel=1e-3)
    assert abs(int(match["spread"]) - 100 * summary["spread"]) <= 0.5


def assert_ratios_and_source(markdown: str, result: dict, ratios: dict, unreliable: dict) -> None:
    for key, value in ratios.items():
        if value is not None:
            line = next(li for li in markdown.splitlines() if li.startswith(f"- `{key}`: "))
            assert_number(line.removeprefix(f"- `{key}`: "), value)
    for key, entry in unreliable.items():
        assert f"- `{key}`: withheld: {entry['reason']}" in markdown
    source = markdown.strip().splitlines()[-1]
    record = result["provenance"]
    assert source.startswith("<sub>Source:") and record["commit"][:7] in source
    assert record["date"][:10] in source and record["cpu_model"] in source
    assert f"`{record['command']}`" in source


def assert_breakdown(table: list[dict[str, str]], label: str, results: dict) -> None:
    assert [cells[label] for cells in table] == list(results)
    for cells in table:
        parts = results[cells[label]]["breakdown"]
        for header, key in (("op forward", "op_forward"), ("op backward", "op_backward"), ("optimiser", "optimiser"),
                            ("model forward and backward, rest", "model_and_rest"), ("step", "profiled_step_seconds")):
            assert_number(cells[header], parts[key])


def rendered(name: str, path: Path) -> str:
    return render.RENDERERS[name]([str(path)])


def test_number_and_timing_cells():
    assert render.number(1234567) == "1,234,567" and render.number(0.000123456) == "0.0001235"
    assert render.timing({"median": 0.0123456, "spread": 0.052}, "ms") == "12.35 ms (5%)"
    rows = [{"r": 0.5}, {"r": None, "unreliable_ratios": {"r": {"reason": "x"}}}, {"r": None}]
    cell = render.ratio_of("r", lambda row: row.get("unreliable_ratios") or {})
    assert [cell(row) for row in rows] == ["0.5", "withheld", ""]


def test_bench_concrete_merge(tmp_path):
    result = run_bench("bench_concrete_merge.py", tmp_path, "--sizes", "20K", "--tasks", "2", "--threads", "1")
    markdown = rendered("bench-concrete-merge", tmp_path / "bench_concrete_merge.json")
    main, phases = tables(markdown)
    assert [r["impl"] for r in main] == [row["impl"] for row in result["rows"]] == ["pyfuse-cpp", "eager"]
    unreliable = {}
    for cells, row in zip(main, result["rows"]):
        assert_number(cells["D"], row["D"])
        assert_timing(cells["forward"], row["fwd"])
        assert_timing(cells["forward+backward"], row["fwd_bwd"])
        assert_number(cells["extra peak MiB"], row["extra_peak_mb"])
        assert_number(cells["copy_ GB/s"], row["copy_gbps"])
        for header, key in (("forward / copy_", "fwd_frac_of_copy"), ("speed-up vs eager", "fwd_bwd_speedup_vs_eager"),
                            ("Philox alone / forward at 70 % of copy_", "noise_share_of_fwd_budget")):
            if key in row["unreliable_ratios"]:
                assert cells[header] == "withheld"
            else:
                assert_number(cells[header], row.get(key))
        unreliable.update({f"{row['impl']} D={row['D']} {k}": v for k, v in row["unreliable_ratios"].items()})
    fused = result["rows"][0]
    # the noise alone against the forward's time at 70 % of copy_'s bandwidth: its median over copy_'s, rescaled
    share = fused["noise_share_of_fwd_budget"]
    assert fused["noise"]["median"] > 0
    assert (share is None) == ("noise_share_of_fwd_budget" in fused["unreliable_ratios"])
    if share is not None:
        assert share == pytest.approx(fused["noise"]["median"] / fused["copy"]["median"] * 0.7 * fused["copy_bytes"]
                                      / fused["fwd_bytes"])
    assert [r["phase"] for r in phases[:5]] == [*fused["phases"], "copy_"]
    for cells, phase in zip(phases, fused["phases"].values()):
        assert_timing(cells["time"], phase)
        assert_number(cells["GB/s"], phase["gbps"])
    assert_ratios_and_source(markdown, result, {}, unreliable)


def test_bench_concrete_step(tmp_path, disk_path):
    result = run_bench("bench_concrete_step.py", tmp_path, "--base-on-disk", str(disk_path), "--vectors-on-disk",
                       str(disk_path), "--tasks", "2", "--batch", "1", "--hidden", "32", "--layers", "1",
                       "--image-size", "32")
    markdown = rendered("bench-concrete-step", tmp_path / "bench_concrete_step.json")
    table, breakdown = tables(markdown)
    assert_breakdown(breakdown, "impl", result["results"])
    assert [r["impl"] for r in table] == ["fused", "eager"]
    assert [(r["base in"], r["vectors in"]) for r in table] == [("disk", "disk"), ("", "")]
    for cells in table:
        run = result["results"][cells["impl"]]
        assert_timing(cells["step"], run["step"])
        assert_timing(cells["step CPU"], run["step_cpu"])
        assert_number(cells["peak RssAnon GiB"], run["peak_rss_anon_gib"])
        assert_number(cells["VmHWM GiB"], run["vmhwm_gib"])
    assert result["ratios"]["peak_rss_anon"] is not None  # memory ratios are always given
    assert_ratios_and_source(markdown, result, result["ratios"], result["unreliable_ratios"])


def test_bench_lora_concrete(tmp_path):
    result = run_bench("bench_lora_concrete.py", tmp_path, "--tasks", "2", "--rank", "2", "--hidden", "32", "--mlp",
                       "48", "--layers", "1", "--heads", "2", "--vocab", "32", "--batch", "1", "--seq", "4")
    markdown = rendered("bench-lora-concrete", tmp_path / "bench_lora_concrete.json")
    table, breakdown = tables(markdown)
    assert [r["task vectors"] for r in table] == ["dense", "factored"]
    assert_breakdown(breakdown, "task vectors", {kind: result[kind] for kind in ("dense", "factored")})
    for cells in table:
        run = result[cells["task vectors"]]
        assert_timing(cells["step"], run["step"])
        assert_timing(cells["step CPU"], run["step_cpu"])
        assert_number(cells["task-vector GiB"], run["task_vector_bytes"] / 2**30)
        assert_number(cells["peak RssAnon GiB"], run["peak_rss_anon_bytes"] / 2**30)
    assert_ratios_and_source(markdown, result, result["ratios"], result["unreliable_ratios"])


def test_bench_static_merge(tmp_path):
    result = run_bench("bench_static_merge.py", tmp_path, "--scale", "0.01", "--repeats", "2", "--warmup", "0",
                       "--skip-sparse", "--methods", "slerp")
    markdown = rendered("bench-static-merge", tmp_path / "bench_static_merge.json")
    runs, others = tables(markdown)
    for table, rows in ((runs, result["runs"]), (others, result["other_methods"])):
        assert [r["run"] for r in table] == [row["run"] for row in rows]
        for cells, row in zip(table, rows):
            assert len(row["wall"]["samples"]) == 2
            assert_timing(cells["wall"], row["wall"])
            assert_number(cells["merge (median)"], row["merge_s"])
            assert_number(cells["peak RssAnon MiB"], row["peak_rss_anon_mib"])
    # two repeats are fewer than a ratio needs: withheld, saying so
    assert "global 2 repeats < 5" in result["unreliable_ratios"]["global_over_tensor_time"]["reason"]
    assert_ratios_and_source(markdown, result, result["ratios"], result["unreliable_ratios"])


def test_bench_distributed(tmp_path):
    result = run_bench("bench_distributed.py", tmp_path, "--scale", "0.01", "--repeats", "1", "--warmup", "0",
                       "--am-tasks", "2", "--am-batch", "1", "--am-steps", "2", "--am-warmup", "0", "--hidden", "32",
                       "--layers", "1", "--image-size", "32")
    markdown = rendered("bench-distributed", tmp_path / "bench_distributed.json")
    merge, step = tables(markdown)
    for table, rows, key in ((merge, result["merge"], "wall"), (step, result["concrete_step"], "step")):
        assert [(r["run"], r["rank"]) for r in table] == [(row["run"], str(row["rank"])) for row in rows]
        for cells, row in zip(table, rows):
            assert_timing(cells[key], row[key])
            assert_number(cells["peak RssAnon MiB"], row["peak_rss_anon_mib"])
    for cells, row in zip(step, result["concrete_step"]):
        assert_number(cells["shard elements"], row["elements"])
    assert_ratios_and_source(markdown, result, result["ratios"], result["unreliable_ratios"])


def test_bench_data_merges(tmp_path):
    result = run_bench("bench_data_merges.py", tmp_path, "--quick", "--no-progress", "--tasks", "2", "--batches", "1",
                       "--batch-size", "2", "--kinds", "gram_in", "--merges", "task_arithmetic,regmean",
                       "--cg-iterations", "0", "--repeats", "2", "--workdir", str(tmp_path / "work"))
    markdown = rendered("bench-data-merges", tmp_path / "bench_data_merges.json")
    statistics, merges = tables(markdown)
    for cells, row in zip(statistics, result["statistics"], strict=True):
        assert cells["statistics"] == row["kind"]
        assert_timing(cells["per task"], row["timing"])
        assert_number(cells["stored MiB / task"], row["stored_mib_per_task"])
    for cells, row in zip(merges, result["merges"], strict=True):
        assert cells["merge"] == row["merge"]
        assert_timing(cells["time"], row["timing"])
        assert_number(cells["peak RssAnon MiB"], row["peak_mib"])
        assert_number(cells["extra MiB"], row["extra_mib"])
    assert_ratios_and_source(markdown, result, {}, {})


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory):
    """A tiny encoder and settings for the demo-based benchmarks (fine-tuned once, cached for both)."""
    from pyfuse.data.embedded import load_embedded_tasks
    from pyfuse.finetune import FinetuneConfig

    from .text_helpers import tiny_encoder_dir

    where = tmp_path_factory.mktemp("demo")
    texts = [text for task in load_embedded_tasks() for text in
             (*task.train_texts, *task.test_texts, *task.class_descriptions)]
    encoder = tiny_encoder_dir(where / "encoder", texts, hidden=16)
    return where, {"tasks": ("tweet_sentiment", "definition_pos"), "test_limit": 40, "stats_examples": 16,
                   "validation_examples": 8, "encoder": str(encoder),
                   "finetune": FinetuneConfig(steps=4, batch_size=16, lr=3e-3, warmup=0.0)}


def test_ablation(tiny_demo, tmp_path, monkeypatch):
    where, tiny = tiny_demo
    ablation = load_benchmark("ablate_concrete_am")
    real = ablation.DemoSettings
    monkeypatch.setattr(ablation, "DemoSettings", lambda **chosen: real(**{**tiny, **chosen,
                                                                          "test_limit": tiny["test_limit"]}))
    monkeypatch.setenv("PYFUSE_CACHE", str(where / "cache"))
    out = tmp_path / "ablation.json"
    ablation.main(["--variants", "adamerging,inner_adam_0.1", "--seeds", "0,1", "--steps", "2", "--json", str(out)])
    result = json.loads(out.read_text())
    markdown = rendered("ablation", out)
    (table,) = tables(markdown)
    assert [r["variant"] for r in table] == [s["variant"] for s in result["summary"]] == ["adamerging",
                                                                                          "inner_adam_0.1"]
    for cells, row in zip(table, result["summary"]):
        mean, std = cells["avg"].split(" ± ")
        assert float(mean) == pytest.approx(100 * row["average"], abs=0.0501)
        assert float(std) == pytest.approx(100 * row["average_std"], abs=0.0501)
        for task, accuracy in row["accuracy"].items():
            assert float(cells[task]) == pytest.approx(100 * accuracy, abs=0.0501)
        variant = result["variants"][row["variant"]]
        expected = ("AdaMerging: " if row["variant"] == "adamerging" else "inner adam 0.1, ") + (
            f"clamp off, lr {render.number(variant['lr'])}, 2 steps")
        assert cells["settings"].startswith(expected), cells["settings"]
    assert result["seeds"] == [0, 1]
    assert_ratios_and_source(markdown, result, {}, {})


def test_bench_data_merges_embedded(tiny_demo, tmp_path, monkeypatch):
    import pyfuse.demo

    where, tiny = tiny_demo
    real = pyfuse.demo.DemoSettings
    monkeypatch.setattr(pyfuse.demo, "DemoSettings", lambda **chosen: real(**{**tiny, **chosen}))
    monkeypatch.setenv("PYFUSE_CACHE", str(where / "cache"))
    out = tmp_path / "embedded.json"
    load_benchmark("bench_data_merges").main(["--embedded", "--no-progress", "--workdir", str(tmp_path / "work"),
                                              "--json", str(out)])
    result = json.loads(out.read_text())
    markdown = rendered("bench-data-merges", out)
    (table,) = tables(markdown)
    rows = result["embedded"]["rows"]
    assert [r["method"] for r in table] == [row["label"] for row in rows]
    for cells, row in zip(table, rows):
        for task, accuracy in row["accuracy"].items():
            assert float(cells[task].split(" ± ")[0]) == pytest.approx(100 * accuracy, abs=0.0501)
    assert_ratios_and_source(markdown, result, {}, {})


@pytest.mark.parametrize("script", sorted(p.name for p in BENCH.glob("*.py") if p.name != "common.py"))
def test_every_benchmark_has_build_parser_and_main_with_argv(script):
    """tests/test_docs.py parses documented commands with `build_parser()`; tests call `main(argv)`."""
    import argparse
    import inspect

    module = load_benchmark(Path(script).stem)
    assert isinstance(module.build_parser(), argparse.ArgumentParser)
    argv = inspect.signature(module.main).parameters.get("argv")
    assert argv is not None and argv.default is None, f"{script}: main(argv=None)"


def _expected_cell(ratios: dict, unreliable: dict, key: str) -> str | float:
    if ratios.get(key) is not None:
        return ratios[key]
    return f"withheld ({unreliable[key]['reason']})"


def test_bench_targets_give_each_target_the_ratio_its_json_holds():
    files = [ROOT / "docs" / "results" / name for name in ("bench-concrete-step.json", "bench-lora-concrete.json",
                                                          "bench-concrete-merge.json")]
    markdown = render.RENDERERS["bench-targets"]([str(f) for f in files])
    (table,) = tables(markdown)
    step, lora, merge = (json.loads(f.read_text()) for f in files)
    expected = [("≤ 0.30", step["ratios"]["peak_rss_anon"]),
                ("", _expected_cell(step["ratios"], step["unreliable_ratios"], "step_time")),
                ("≤ 1.0", _expected_cell(lora["ratios"], lora["unreliable_ratios"], "step_seconds")),
                ("≤ 0.45", lora["ratios"]["peak_rss_anon_bytes"])]
    largest = max(row["D"] for row in merge["rows"])
    for row in merge["rows"]:
        if row["impl"] == "pyfuse-cpp" and row["D"] == largest:
            withheld = row.get("unreliable_ratios") or {}
            expected += [("≥ 0.70", _expected_cell(row, withheld, "fwd_frac_of_copy")),
                         ("≥ 0.60", _expected_cell(row, withheld, "kernel_bwd_frac_of_copy")),
                         ("(< 1 for ≥ 0.70 to be possible)",
                          _expected_cell(row, withheld, "noise_share_of_fwd_budget"))]
    assert [cells["target"] for cells in table] == [target for target, _ in expected]
    for cells, (_, figure) in zip(table, expected):
        if isinstance(figure, str):
            assert cells["ratio"] == figure
        else:
            assert_number(cells["ratio"], figure)
    assert "task vectors on disk, base on disk" in table[0]["measured"]
    sources = [line for line in markdown.splitlines() if line.startswith("- <sub>Source:")]
    assert len(sources) == 3
    for line, result in zip(sources, (step, lora, merge)):
        assert result["provenance"]["commit"][:7] in line and f"`{result['provenance']['command']}`" in line
