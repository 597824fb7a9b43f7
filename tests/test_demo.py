"""`pyfuse demo` end to end on the real embedded tasks, with a tiny encoder and tiny schedules."""

from __future__ import annotations

import json
import os
import re
import stat

import pytest
import torch

from pyfuse.cli import main
from pyfuse.data.embedded import load_embedded_tasks
from pyfuse.demo import (
    ENTROPY_WINDOW,
    FIGURE_NAME,
    LABELS,
    METHODS,
    REPORT_NAME,
    ROWS,
    STOCHASTIC,
    DemoSettings,
    chance_bound,
    demo_figure,
    moving_average,
    run_demo,
)
from pyfuse.finetune import FinetuneConfig

from .text_helpers import tiny_encoder_dir

TASKS = ("tweet_sentiment", "noun_supersense", "definition_pos")


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    texts = [text for task in load_embedded_tasks() for text in
             (*task.train_texts, *task.test_texts, *task.class_descriptions)]
    return tiny_encoder_dir(tmp_path_factory.mktemp("encoder"), texts, hidden=48)


FINETUNE = FinetuneConfig(steps=60, batch_size=32, lr=3e-3, warmup=0.0)


def test_demo_pipeline(encoder, tmp_path):
    settings = DemoSettings(tasks=TASKS, steps=2, test_limit=120, seeds=(0, 1), encoder=str(encoder),
                            finetune=FINETUNE)
    report = run_demo(settings, tmp_path / "out", cache_dir=tmp_path / "cache", progress=False)
    on_disk = json.loads((tmp_path / "out" / REPORT_NAME).read_text())
    assert on_disk == json.loads(json.dumps(report))
    assert (tmp_path / "out" / FIGURE_NAME).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    umask = os.umask(0o022)
    os.umask(umask)
    for name in (REPORT_NAME, FIGURE_NAME):  # readable like any file the user writes, not tempfile's 0600
        assert stat.S_IMODE((tmp_path / "out" / name).stat().st_mode) == 0o666 & ~umask

    assert [t["name"] for t in report["tasks"]] == list(TASKS)
    assert [row["method"] for row in report["rows"]] == ["individual", "pretrained", *METHODS]
    for row in report["rows"]:
        assert set(row["accuracy"]) == set(TASKS) and all(0 <= a <= 1 for a in row["accuracy"].values())
        assert row["average"] == pytest.approx(sum(row["accuracy"].values()) / len(TASKS))
        if row["method"] in METHODS:
            assert row["seconds"] > 0 and row["peak_rss_anon_bytes"] > 0
        assert all(0 < share <= 1 for share in row["max_class_share"].values())
        bounds = {t["name"]: t["chance_bound"] for t in report["tasks"]}
        assert row["at_chance"] == [t for t in TASKS if row["accuracy"][t] <= bounds[t]]
        if row["method"] in STOCHASTIC:  # once per seed: mean and sample std over the per-seed values
            per_seed = row["per_seed"]
            assert [r["seed"] for r in per_seed] == row["seeds"] == [0, 1]
            averages = [r["average"] for r in per_seed]
            assert row["average"] == pytest.approx(sum(averages) / 2)
            assert row["average_std"] == pytest.approx(abs(averages[0] - averages[1]) / 2 ** 0.5)
            for t in TASKS:
                values = [r["accuracy"][t] for r in per_seed]
                assert row["accuracy"][t] == pytest.approx(sum(values) / 2)
                assert row["accuracy_std"][t] == pytest.approx(abs(values[0] - values[1]) / 2 ** 0.5)
        else:  # deterministic: run once
            assert row["average_std"] is None and row["per_seed"] is None
    individual, pretrained = report["rows"][0]["accuracy"], report["rows"][1]["accuracy"]
    for task in TASKS:  # every fine-tuned model beats the pre-trained one on its own task
        assert individual[task] > pretrained[task] + 0.05, (task, individual[task], pretrained[task])
    assert set(report["curves"]) == {"adamerging", "concrete_task_arithmetic", "concrete_adamerging"}
    concrete = report["curves"]["concrete_adamerging"]
    assert [p["steps"] for p in concrete["phases"]] == [2, 2] and len(concrete["entropy"]["value"]) == 4
    assert concrete["eval_mask"]["mode"] == "relaxed" and report["seeds"] == [0, 1] and report["finetune_seed"] == 0
    assert [t["test"] for t in report["tasks"]] == [120] * len(TASKS)
    assert not any(r["reused"] for r in report["finetuned"].values())
    rows = {row["method"]: row for row in report["rows"]}
    assert rows["adamerging"]["mask"] is None
    for name in ("concrete_task_arithmetic", "concrete_adamerging"):  # the mask's movement, mean over the seeds
        moved = rows[name]["mask"]
        assert 0 < moved["mean_abs_p_minus_half"] < 0.5 and 0 <= moved["fraction_above_0.9"] <= 1
    assert report["provenance"]["cores"] == os.cpu_count() and report["provenance"]["torch"] == torch.__version__
    _check_rendered_tables(report, tmp_path / "out" / REPORT_NAME)


def _check_rendered_tables(report, path):
    """docs/render.py's tables of this report carry its numbers, row by row, and its provenance."""
    from .test_docs import render

    table = render.demo_table([str(path)])
    cells = [line.strip("|").split(" | ") for line in table.splitlines() if line.startswith("| ")][2:]
    assert [c[0].strip() for c in cells] == [row["label"] for row in report["rows"]]
    for row, line in zip(report["rows"], cells):
        expected = f"{100 * row['average']:.1f}" + ("" if row["average_std"] is None else
                                                      f" ± {100 * row['average_std']:.1f}")
        assert line[len(TASKS) + 1].strip("* ") == expected
        for i, task in enumerate(TASKS):
            assert line[1 + i].startswith(f"{100 * row['accuracy'][task]:.1f}")
        if row["mask"] is not None:
            assert line[-2].strip() == f"{row['mask']['mean_abs_p_minus_half']:.3f}"
    assert report["provenance"]["date"][:10] in table and report["provenance"]["cpu_model"] in table
    # a second report of the same setting joins in the registry's order, whatever order its rows came in
    other = json.loads(path.read_text())
    other["rows"] = other["rows"][::-1]
    (path.parent / "other.json").write_text(json.dumps(other))
    joined = render.demo_table([str(path.parent / "other.json"), str(path)])
    assert [line.split(" | ")[0].strip("| ") for line in joined.splitlines() if line.startswith("| ")][2:] == [
        row["label"] for row in report["rows"]]
    other["settings"]["steps"] += 1  # another setting: refused, naming it
    (path.parent / "other.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match="setting 'steps' is"):
        render.demo_table([str(path), str(path.parent / "other.json")])
    # other learning rates: only the rows that learn depend on them, so only those are refused
    static, other = json.loads(path.read_text()), json.loads(path.read_text())
    static["rows"] = [row for row in static["rows"] if row["method"] not in static["curves"]]
    other["learning_rates"] = {key: 10 * rate for key, rate in other["learning_rates"].items()}
    for name, report_ in (("static.json", static), ("other.json", other)):
        (path.parent / name).write_text(json.dumps(report_))
    first = render.demo_table([str(path), str(path.parent / "other.json")])  # every row from the first report
    assert first.split("\n\n")[0] == render.demo_table([str(path)]).split("\n\n")[0]
    learner = next(row["label"] for row in other["rows"] if row["method"] in other["curves"])
    with pytest.raises(ValueError, match=f"other.json: {re.escape(learner)} learned at learning rates"):
        render.demo_table([str(path.parent / "static.json"), str(path.parent / "other.json")])
    # the summary: one column per setting, and their mean where a method has every column
    other = json.loads(path.read_text())
    other["rows"] = [{**row, "average": row["average"] - 0.1} for row in other["rows"][:-1]]  # one method absent
    (path.parent / "other.json").write_text(json.dumps(other))
    summary = render.demo_summary([f"a={path}", f"b={path.parent / 'other.json'}"])
    lines = [line.strip("|").split(" | ") for line in summary.splitlines() if line.startswith("| ")]
    assert [c.strip() for c in lines[0]] == ["method", "a", "b", "mean of the columns"]
    for row, cells in zip(report["rows"], lines[2:]):
        assert cells[1].strip("* ").startswith(f"{100 * row['average']:.1f}")
        if row is report["rows"][-1]:
            assert cells[2].strip() == cells[3].strip() == ""
        else:
            assert cells[2].strip("* ").startswith(f"{100 * (row['average'] - 0.1):.1f}")
            assert cells[3].strip("* ") == f"{100 * (row['average'] - 0.05):.1f}"
    merged = [r["average"] for r in report["rows"] if r["method"] not in ("individual", "pretrained")]
    assert sum(cells[1].startswith("**") for cells in lines[2:]) == merged.count(max(merged))
    schedules = render.schedules_table([str(path)])
    adaptive = [line for line in schedules.splitlines() if line.startswith("| ")][2:]
    assert [line.split(" | ")[0].strip("| ") for line in adaptive] == [
        row["label"] for row in report["rows"] if row["method"] in report["curves"]]


def test_cli_demo_reuses_the_cache_and_keeps_the_earlier_report(encoder, tmp_path, capsys):
    args = ["demo", "--quick", "--steps", "1", "--tasks", ",".join(TASKS[:2]), "--methods", "task_arithmetic,ties",
            "--encoder", str(encoder), "--finetune-steps", "60", "--finetune-lr", "3e-3",
            "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "out"), "--no-progress"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert "0 reused from the cache, 2 trained" in first
    header = next(line for line in first.splitlines() if line.startswith("Method"))
    assert header.split()[:4] == ["Method", *TASKS[:2], "Avg."]
    for label in ("Individual", "Pre-trained", "Task Arithmetic", "Ties-Merging"):
        assert any(line.startswith(label) for line in first.splitlines())
    assert f"report: {(tmp_path / 'out' / REPORT_NAME).resolve()}" in first
    assert f"figure: {(tmp_path / 'out' / FIGURE_NAME).resolve()}" in first
    assert main(args) == 0
    assert "2 reused from the cache, 0 trained" in capsys.readouterr().out
    kept = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert len([n for n in kept if n.startswith("report")]) == 2 and REPORT_NAME in kept


def test_cli_finetune_fills_the_cache_the_demo_reads(encoder, tmp_path, capsys):
    """`pyfuse finetune` builds the encoder and tasks as the demo does: the demo then trains nothing."""
    shared = ["--tasks", ",".join(TASKS[:2]), "--encoder", str(encoder), "--finetune-steps", "60",
              "--finetune-lr", "3e-3", "--cache", str(tmp_path / "cache"), "--no-progress"]
    assert main(["finetune", *shared]) == 0
    assert capsys.readouterr().out.count("trained") == 2
    assert main(["demo", "--quick", "--steps", "1", "--methods", "task_arithmetic", "--out", str(tmp_path / "out"),
                 *shared]) == 0
    assert "2 reused from the cache, 0 trained" in capsys.readouterr().out


def test_demo_regmean_plusplus_row_is_the_engine_merge_on_the_statistics_examples(encoder, tmp_path):
    """The opt-in regmean++ row: one deterministic run whose merged encoder is `pyfuse.merge("regmean++")`
    on the unlabeled examples RegMean's statistics come from (here 40 per task), scored like every row."""
    import torch

    import pyfuse
    from pyfuse.demo import _statistics_batches, evaluate, prepare_demo

    settings = DemoSettings(tasks=TASKS[:2], methods=("regmean", "regmean++"), test_limit=60, stats_examples=40,
                            encoder=str(encoder), finetune=FINETUNE)
    report = run_demo(settings, tmp_path / "out", cache_dir=tmp_path / "cache", progress=False)
    row = next(r for r in report["rows"] if r["method"] == "regmean++")
    assert row["label"] == "RegMean++" and row["per_seed"] is None and row["seconds"] > 0
    ctx = prepare_demo(settings, cache_dir=tmp_path / "cache", progress=False)
    tasks = [pyfuse.Task(t.name, [b for b, _ in _statistics_batches(ctx.encoder, t, settings)], t.logits)
             for t in ctx.tasks]
    assert [len(t.batches) for t in tasks] == [3, 3]  # 40 examples in batches of 16
    merged = pyfuse.merge("regmean++", ctx.encoder.module, list(ctx.models.values()), tasks=tasks)

    def call(*args, **kwargs):
        return torch.func.functional_call(ctx.encoder.module, merged, args, kwargs)

    assert evaluate(call, ctx.adaptation(0)).accuracy == row["accuracy"]
    regmean = next(r for r in report["rows"] if r["method"] == "regmean")["accuracy"]
    assert row["accuracy"] != regmean  # Grams on the merged blocks' outputs, not on each fine-tuned model's


def test_chance_bound_is_chance_plus_two_binomial_standard_errors():
    assert chance_bound(4, 400) == pytest.approx(0.25 + 2 * (0.25 * 0.75 / 400) ** 0.5)
    assert chance_bound(8, 100) == pytest.approx(0.125 + 2 * (0.125 * 0.875 / 100) ** 0.5)


def test_bad_settings_fail_before_any_work():
    with pytest.raises(ValueError, match="distinct"):
        DemoSettings(seeds=(0, 0))
    with pytest.raises(ValueError, match="unknown demo method 'tiess'"):
        DemoSettings(methods=("tiess",))
    with pytest.raises(ValueError, match="unknown embedded task"):
        load_embedded_tasks(["no_such_task"])


def _figure_report() -> dict:
    """A demo report in the shape run_demo writes: two deterministic rows, two rows over 3 seeds, and the
    entropy curves of a one-phase and a two-phase (3 meta steps, then 3 AdaMerging steps) adaptive run."""
    tasks = ["a", "b"]

    def row(method, accuracy, std=None):
        return {"method": method, "label": LABELS[method], "accuracy": dict(zip(tasks, accuracy)),
                "average": sum(accuracy) / 2, "accuracy_std": dict(zip(tasks, std)) if std else None,
                "average_std": sum(std) / 4 if std else None}

    curve = {"step": [1, 2, 3, 4, 5, 6], "phase": ["meta"] * 3 + ["adapt"] * 3, "value": [3, 2, 1.5, 1.4, 1.2, 1.1]}
    return {"benchmark": "test", "tasks": [{"name": t} for t in tasks], "seeds": [0, 1, 2],
            "rows": [row("individual", [0.9, 0.8]), row("task_arithmetic", [0.7, 0.6]),
                     row("adamerging", [0.75, 0.65], [0.02, 0.04]),
                     row("concrete_adamerging", [0.72, 0.7], [0.1, 0.0])],
            "curves": {"adamerging": {"entropy": {"step": [1, 2, 3], "phase": ["adapt"] * 3, "value": [2, 1.8, 1.7]}},
                       "concrete_adamerging": {"entropy": curve}}}


def test_demo_figure_colours_error_bars_legends_ticks_and_phase_marker():
    report = _figure_report()
    figure = demo_figure(report)
    figure.canvas.draw()
    bars, curves = figure.axes
    renderer = figure.canvas.get_renderer()
    for ax in (bars, curves):  # each legend beside its axes, clear of what they draw
        assert ax.get_legend().get_window_extent(renderer).x0 >= ax.get_window_extent(renderer).x1
    containers = {c.get_label(): c for c in bars.containers}
    lines = {line.get_label(): line for line in curves.get_lines()}
    colours = [tuple(containers[row["label"]].patches[0].get_facecolor()) for row in report["rows"]]
    assert len(set(colours)) == len(report["rows"])  # one colour per method
    for row in report["rows"]:
        container = containers[row["label"]]
        assert len({tuple(p.get_facecolor()) for p in container.patches}) == 1
        if row["method"] in report["curves"]:  # the same colour in the entropy panel
            colour = container.patches[0].get_facecolor()[:3]
            assert tuple(float(c) for c in lines[row["label"]].get_color()[:3]) == pytest.approx(colour)
        if row["accuracy_std"] is None:
            assert container.errorbar is None
        else:  # error bars span mean ± std, in percent, for each task and the average
            segments = container.errorbar.lines[2][0].get_segments()
            stds = [row["accuracy_std"]["a"], row["accuracy_std"]["b"], row["average_std"]]
            assert [s[1][1] - s[0][1] for s in segments] == pytest.approx([200 * v for v in stds])
    ticks = [t for t in curves.get_xticks() if curves.get_xlim()[0] <= t <= curves.get_xlim()[1]]
    assert ticks and all(float(t).is_integer() for t in ticks)
    markers = [line for line in curves.get_lines() if line.get_linestyle() == ":"]
    assert len(markers) == 1 and list(markers[0].get_xdata()) == [3.5, 3.5]  # after meta step 3, before step 4
    assert markers[0].get_color() == lines[LABELS["concrete_adamerging"]].get_color()


def test_demo_command_line_sets_the_adaptive_schedule():
    from pyfuse.cli import build_parser, demo_settings

    default = demo_settings(build_parser().parse_args(["demo"]))
    assert (default.coefficient_lr, default.logits_lr) == pytest.approx((0.1 / default.steps, 2.0 / default.steps))
    assert default.clamp and default.inner_lr == 0.1 and default.seeds == (0,) and default.test_limit is None
    clip = demo_settings(build_parser().parse_args(
        ["demo", "--steps", "1000", "--lr", "1e-3", "--mask-lr", "1e-3", "--inner-lr", "1", "--no-clamp"]))
    assert (clip.steps, clip.coefficient_lr, clip.logits_lr) == (1000, 1e-3, 1e-3)
    assert (clip.inner_lr, clip.clamp) == (1.0, False)
    quick = demo_settings(build_parser().parse_args(["demo", "--quick", "--seeds", "3,4"]))
    assert (quick.steps, quick.test_limit, quick.seeds) == (10, 100, (3, 4))


@pytest.mark.parametrize("option", ["--lr", "--mask-lr", "--inner-lr"])
def test_demo_refuses_a_non_positive_learning_rate_before_any_work(option, tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", option, "-1", "--out", str(out)]) == 1
    err = capsys.readouterr()
    assert f"{option.lstrip('-').replace('-', '_')} must be a positive finite number" in err.err
    assert "fine-tuned models" not in err.out  # refused before the encoder and models were loaded
    assert not out.exists()


def test_entropy_moving_average_is_a_trailing_mean_within_each_phase():
    values = [3.0, 1.0, 2.0, 6.0, 4.0, 5.0, 0.0]
    phases = ["meta"] * 4 + ["adapt"] * 3
    # window 3: means of the last up-to-3 values, restarting where the phase changes
    assert moving_average(values, 3, phases) == pytest.approx([3, 2, 2, 3, 4, 4.5, 3])
    assert moving_average(values, 3) == pytest.approx([3, 2, 2, 3, 4, 5, 3])
    assert moving_average(values, 1) == values
    with pytest.raises(ValueError, match="window"):
        moving_average(values, 0)


def test_demo_figure_draws_the_smoothed_entropy_beside_the_raw_one():
    report = _figure_report()
    _, curves = demo_figure(report).axes
    lines = {line.get_label(): line for line in curves.get_lines()}
    for method, curve in report["curves"].items():
        entropy = curve["entropy"]
        raw, smooth = lines[f"{LABELS[method]}, per batch"], lines[LABELS[method]]
        assert list(raw.get_ydata()) == entropy["value"] and raw.get_color() == smooth.get_color()
        assert list(smooth.get_ydata()) == pytest.approx(
            moving_average(entropy["value"], ENTROPY_WINDOW, entropy["phase"]))
        assert smooth.get_linewidth() > raw.get_linewidth()
    assert f"moving average over {ENTROPY_WINDOW} steps" in curves.get_title()


def test_the_concrete_rows_over_other_vectors_are_opt_in_and_run_their_source():
    new = {"concrete_tsvm": "tsv", "concrete_task_arithmetic_ties": "ties", "concrete_adamerging_tsv": "tsv",
           "concrete_adamerging_ties": "ties"}
    for name, source in new.items():
        assert ROWS[name].opt_in and name not in METHODS and name in STOCHASTIC
        assert ROWS[name].instance().settings().vectors == source
    assert DemoSettings(methods=tuple(new)).methods == tuple(new)


def test_demo_runs_the_concrete_rows_over_other_vectors(encoder, tmp_path):
    rows = ("concrete_tsvm", "concrete_task_arithmetic_ties", "concrete_adamerging_tsv", "concrete_adamerging_ties")
    settings = DemoSettings(tasks=TASKS[:2], methods=rows, steps=1, test_limit=40, encoder=str(encoder),
                            finetune=FINETUNE)
    report = run_demo(settings, tmp_path / "out", cache_dir=tmp_path / "cache", progress=False)
    assert [row["method"] for row in report["rows"]] == ["individual", "pretrained", *rows]
    assert [row["label"] for row in report["rows"][2:]] == [LABELS[name] for name in rows]
    assert set(report["curves"]) == set(rows)
    for name in rows:
        phases = [phase["name"] for phase in report["curves"][name]["phases"]]
        assert phases == (["meta", "adapt"] if "adamerging" in name else ["meta"])


def test_the_demo_collects_the_seedless_statistics_once_over_its_seeds(encoder, tmp_path, monkeypatch):
    """On gold labels only ESM's sampled "acts" depend on the seed: the other kinds are collected once for all
    seeds, and the rows that need only them run once (the seed cannot change them); ESM runs per seed."""
    import pyfuse.demo as demo

    assert {"esm", "esm++"} <= set(STOCHASTIC)
    assert not {"fisher", "regmean", "mats_regmean", "mats_kfac"} & set(STOCHASTIC)
    calls = []
    real_collect = demo.collect_statistics

    def collect(model, batches, logits, **kwargs):
        calls.append((kwargs["name"], tuple(kwargs["kinds"]), kwargs["seed"]))
        return real_collect(model, batches, logits, **kwargs)

    monkeypatch.setattr(demo, "collect_statistics", collect)
    settings = DemoSettings(tasks=TASKS[:2], methods=("fisher", "esm"), seeds=(0, 1), test_limit=30,
                            stats_examples=16, encoder=str(encoder), finetune=FINETUNE)
    report = run_demo(settings, tmp_path / "out", cache_dir=tmp_path / "cache", progress=False)
    assert calls == [(t, ("fisher",), 0) for t in TASKS[:2]] + [(t, ("acts",), s) for s in (0, 1) for t in TASKS[:2]]
    rows = {row["method"]: row for row in report["rows"]}
    assert rows["fisher"]["per_seed"] is None and rows["fisher"]["seeds"] == [0]
    assert [r["seed"] for r in rows["esm"]["per_seed"]] == [0, 1]


def test_the_demo_runs_its_data_aware_rows_on_lora_fine_tunes(encoder, tmp_path, monkeypatch):
    """Under LoRA only the targets are merged: the statistics cover those (a Fisher of every parameter was
    refused by the merge, naming a LayerNorm bias), and every data-aware row runs."""
    import pyfuse.demo as demo

    collected = []
    real_collect = demo.collect_statistics

    def collect(model, batches, logits, **kwargs):
        collected.append(real_collect(model, batches, logits, **kwargs))
        return collected[-1]

    monkeypatch.setattr(demo, "collect_statistics", collect)
    rows = ("fisher", "regmean", "regmean++", "mats_regmean", "mats_kfac", "esm", "esm++")
    lora = FinetuneConfig(mode="lora", steps=20, batch_size=32, lr=3e-3, warmup=0.0, lora_r=4, lora_alpha=8)
    settings = DemoSettings(tasks=TASKS[:2], methods=rows, test_limit=30, stats_examples=16, encoder=str(encoder),
                            finetune=lora)
    report = run_demo(settings, tmp_path / "out", cache_dir=tmp_path / "cache", progress=False)
    assert [row["method"] for row in report["rows"][2:]] == list(rows)
    targets = {key for stats in collected for kind in stats.kinds() for key in stats.names(kind)}
    assert targets and all(key.endswith((".query.weight", ".value.weight", ".query.bias", ".value.bias"))
                           for key in targets), sorted(targets)


def test_the_demo_runs_its_data_aware_rows_on_its_device(encoder, tmp_path, monkeypatch):
    """The statistics, the data-aware merges and regmean++ get the demo's device (the CPU given explicitly
    here; tests/test_device_data.py shows what each does with a device), and with them every batch and head."""
    import pyfuse.demo as demo

    calls = []
    real_collect, real_plan, real_merge = demo.collect_statistics, demo.plan_merge, demo.merge

    def collect(model, batches, logits, **kwargs):
        calls.append(("statistics", kwargs["device"]))
        return real_collect(model, batches, logits, **kwargs)

    def plan(name, *args, **kwargs):
        calls.append((name, kwargs["device"]))
        return real_plan(name, *args, **kwargs)

    def merge(name, *args, **kwargs):
        if name == "regmean++":
            calls.append((name, kwargs["device"]))
            assert {t.batches[0]["input_ids"].device.type for t in kwargs["tasks"]} == {"cpu"}
        return real_merge(name, *args, **kwargs)

    monkeypatch.setattr(demo, "collect_statistics", collect)
    monkeypatch.setattr(demo, "plan_merge", plan)
    monkeypatch.setattr(demo, "merge", merge)
    settings = DemoSettings(tasks=TASKS[:2], methods=("fisher", "regmean++"), test_limit=30, stats_examples=16,
                            encoder=str(encoder), finetune=FINETUNE, device="cpu")
    report = run_demo(settings, tmp_path / "out", cache_dir=tmp_path / "cache", progress=False)
    assert {row["method"] for row in report["rows"]} >= {"fisher", "regmean++"}
    assert calls == [("statistics", "cpu")] * 2 + [("fisher", "cpu"), ("regmean++", "cpu")]
