"""Render the generated parts of README.md and docs/*.md: `make docs` writes them, `make docs-check` (and
tests/test_docs.py) fails when a file differs from what this script renders.

A generated part sits between two markers, the first naming a renderer and its arguments:

    <!-- render: demo results/demo-full.json -->
    ... (written by this script; edits here are overwritten) ...
    <!-- /render -->

Renderers (`RENDERERS`): result tables from the JSON files under docs/results/ that the demo and the benchmarks
wrote (each table followed by its provenance: command, commit, date, CPU, torch, load), and reference text taken
from the code itself (the methods' registry, the command line's help). Paths are relative to docs/.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
MARKER = re.compile(r"(<!-- render: (?P<spec>[^>]*?) -->\n)(?P<body>.*?)(<!-- /render -->)", re.S)

Renderer = Callable[[list[str]], str]
RENDERERS: dict[str, Renderer] = {}


def renderer(name: str) -> Callable[[Renderer], Renderer]:
    def register(fn: Renderer) -> Renderer:
        RENDERERS[name] = fn
        return fn
    return register


def documents() -> list[Path]:
    """The files whose generated parts this script owns: README.md and every docs/*.md."""
    return [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]


def render_text(text: str, where: str | os.PathLike = DOCS / "<text>") -> str:
    """`text`, the document at `where`, with every generated part re-rendered (result paths relative to it)."""
    global _document_dir
    _document_dir = Path(where).parent

    def replace(match: re.Match) -> str:
        name, *args = match["spec"].split()
        if name not in RENDERERS:
            raise ValueError(f"{where}: unknown renderer {name!r} (known: {', '.join(sorted(RENDERERS))})")
        body = RENDERERS[name](args).rstrip("\n") + "\n"
        return match.group(1) + body + match.group(4)
    return MARKER.sub(replace, text)


# ---------------------------------------------------------------------------------------------
# provenance
# ---------------------------------------------------------------------------------------------
_document_dir = DOCS  # the directory of the document being rendered: result paths are relative to it


def load_result(path: str) -> dict[str, Any]:
    file = _document_dir / path
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no such result file (run the command its table names)")
    return json.loads(file.read_text())


def provenance_line(record: dict[str, Any], path: str) -> str:
    """One line saying where a table's figures come from: the code's commit (later commits may have changed it:
    `git log COMMIT..` lists them; a modified tree is said), the command, the machine."""
    commit = record.get("commit") or "an unknown commit"
    short = commit[:7] + (" with uncommitted changes" if commit.endswith("+dirty") else "")
    load = record.get("load_average")
    after = record.get("load_average_after")
    loads = "" if load is None else f", load {load:.1f}" + ("" if after is None else f"→{after:.1f}")
    command = str(record.get("command"))
    threads = record.get("threads", "?")
    if command.startswith("__main__.py "):  # recorded before provenance kept `python -m pyfuse` whole
        command = "python -m pyfuse " + command.removeprefix("__main__.py ")
    return (f"<sub>Source: [`{path}`]({path}) — `{command}`; "
            f"measured at commit {short}, {record.get('date', '?')[:10]}, {record.get('cpu_model', '?')}, "
            f"{record.get('cores', '?')} cores, {threads} thread{'' if threads == 1 else 's'}{loads}, "
            f"torch {record.get('torch', '?')}.</sub>")


# ---------------------------------------------------------------------------------------------
# the demo's report
# ---------------------------------------------------------------------------------------------
def _cell(value: float, std: float | None) -> str:
    return f"{100 * value:.1f}" + ("" if std is None else f" ± {100 * std:.1f}")


def _seconds(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:.1f} s" if value < 600 else f"{value / 60:.1f} min"


@renderer("demo")
def demo_table(args: list[str]) -> str:
    """`demo FILE [FILE...]`: the demo's accuracy table (mean ± sample std over seeds), one row per method;
    several reports of one setting (same fine-tuned models) are joined, each method taken from the first file
    that has it; the mask columns say how far a learned Concrete mask moved from its uniform start."""
    reports = [load_result(path) for path in args]
    return demo_markdown(reports, [provenance_line(r["provenance"], p) for r, p in zip(reports, args)], args)


def in_table_order(methods: Any) -> list[str]:
    """`methods` in the demo table's order: Individual, Pre-trained, then the registry's rows (each Concrete row
    beside the method it builds on); names the registry lacks last."""
    from pyfuse.demo import ROWS

    order = ["individual", "pretrained", *ROWS]
    return sorted(methods, key=lambda n: order.index(n) if n in order else len(order))


def schedule_text(report: dict[str, Any]) -> str:
    """The report's fine-tuning, seeds and adaptive schedule, in words."""
    rates, settings = report["learning_rates"], report["settings"]
    return (f"fine-tuning `{settings['finetune']['mode']}` (seed {report['finetune_seed']}), adaptation seeds "
            f"{','.join(map(str, report['seeds']))}, {settings['steps']}-step adaptive schedules (Adam lr "
            f"{rates['coefficients']:.3g} on the coefficients, {rates['mask_logits']:.3g} on the mask logits, inner "
            f"lr {rates['inner']:.3g})")


def joined_rows(reports: list[dict[str, Any]], args: list[str]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The first report and the rows of all `reports` (files `args`), each method from the first report that has
    it, in the table's order (`in_table_order`); refused unless every report is of one setting: the same
    fine-tuned models, every setting but the methods equal, and the rows that learn (the ones with curves)
    learned at the first report's learning rates (a row that learns nothing does not depend on them)."""
    first = reports[0]
    tasks = [t["name"] for t in first["tasks"]]
    models = {name: entry["path"] for name, entry in first["finetuned"].items()}
    found: dict[str, dict[str, Any]] = {}
    for path, report in zip(args, reports):
        if [t["name"] for t in report["tasks"]] != tasks or models != {
                name: entry["path"] for name, entry in report["finetuned"].items()}:
            raise ValueError(f"{path}: not the fine-tuned models of {args[0]} (a table joins reports of one setting)")
        differing = [key for key in sorted({*first["settings"], *report["settings"]}) if key != "methods"
                     and report["settings"].get(key) != first["settings"].get(key)]
        if differing:
            key = differing[0]
            raise ValueError(f"{path}: setting {key!r} is {report['settings'].get(key)!r}, "
                             f"{first['settings'].get(key)!r} in {args[0]} (a table joins reports of one setting)")
        for row in report["rows"]:
            if row["method"] in found:
                continue
            if row["method"] in report.get("curves", {}) and report["learning_rates"] != first["learning_rates"]:
                raise ValueError(f"{path}: {row['label']} learned at learning rates {report['learning_rates']}, "
                                 f"{first['learning_rates']} in {args[0]} (a table joins reports of one setting)")
            found[row["method"]] = row
    return first, {name: found[name] for name in in_table_order(found)}


def demo_markdown(reports: list[dict[str, Any]], sources: list[str], args: list[str]) -> str:
    """The demo's table from its reports, followed by the `sources` lines (see `demo_table`)."""
    first, rows = joined_rows(reports, args)
    tasks = [t["name"] for t in first["tasks"]]
    best = max(row["average"] for name, row in rows.items() if name not in ("individual", "pretrained"))
    header = ["method", *tasks, "avg", "time / seed", "mask \\|p−½\\|", "p<0.1 / p>0.9"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for row in rows.values():
        stds = row.get("accuracy_std") or {}
        average = _cell(row["average"], row.get("average_std"))
        mask = row.get("mask")
        cells = [row["label"], *(_cell(row["accuracy"][t], stds.get(t)) for t in tasks),
                 f"**{average}**" if row["average"] == best else average, _seconds(row.get("seconds")),
                 "" if mask is None else f"{mask['mean_abs_p_minus_half']:.3f}",
                 "" if mask is None else
                 f"{100 * mask['fraction_below_0.1']:.1f}% / {100 * mask['fraction_above_0.9']:.1f}%"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Test accuracy (%), {schedule_text(first)}; stochastic rows: mean ± sample std over seeds."]
    lines += ["", *sources]
    return "\n".join(lines)


@renderer("demo-summary")
def demo_summary(args: list[str]) -> str:
    """`demo-summary NAME=FILE[,FILE...] ...`: each method's average accuracy (mean ± sample std over seeds) in
    several settings side by side, one column per NAME (its files joined as `demo` joins them), and the mean of
    the columns where a method has them all; the best of each column in bold."""
    columns: list[tuple[str, dict[str, dict[str, Any]]]] = []
    sources: list[str] = []
    settings_lines: list[str] = []
    for arg in args:
        name, _, files = arg.partition("=")
        paths = files.split(",")
        if not name or not files:
            raise ValueError(f"demo-summary: {arg!r} is not NAME=FILE[,FILE...]")
        reports = [load_result(path) for path in paths]
        first, rows = joined_rows(reports, paths)
        columns.append((name, rows))
        settings_lines.append(f"{name}: {schedule_text(first)}.")
        sources += [provenance_line(r["provenance"], path) for r, path in zip(reports, paths)]
    order = in_table_order({method for _, rows in columns for method in rows})
    merges = [m for m in order if m not in ("individual", "pretrained")]

    def both(method: str) -> float | None:
        values = [rows[method]["average"] for _, rows in columns if method in rows]
        return statistics.fmean(values) if len(values) == len(columns) else None

    best = {name: max(rows[m]["average"] for m in merges if m in rows) for name, rows in columns}
    best_both = max((v for v in map(both, merges) if v is not None), default=None)
    header = ["method", *(name for name, _ in columns), "mean of the columns"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for method in order:
        label = next(rows[method]["label"] for _, rows in columns if method in rows)
        cells = [label]
        for name, rows in columns:
            row = rows.get(method)
            cell = "" if row is None else _cell(row["average"], row.get("average_std"))
            cells.append(f"**{cell}**" if row is not None and row["average"] == best[name] and method in merges
                         else cell)
        mean = both(method)
        cells.append("" if mean is None else (f"**{100 * mean:.1f}**" if mean == best_both and method in merges
                                              else f"{100 * mean:.1f}"))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Average test accuracy (%) over the tasks; stochastic rows: mean ± sample std over seeds. "
              + " ".join(settings_lines), "", *sources]
    return "\n".join(lines)


@renderer("schedules")
def schedules_table(args: list[str]) -> str:
    """`schedules FILE [FILE...]`: the adaptive rows of several demo reports, one setting per report (its steps,
    learning rates, inner lr, clamp), with accuracy over seeds and how far the learned mask moved."""
    from pyfuse.demo import ROWS
    from pyfuse.methods import get_method

    reports = [load_result(path) for path in args]
    header = ["method", "fine-tuning", "steps", "lr", "mask lr", "inner lr", "clamp", "seeds", "avg", "worst task",
              "mask \\|p−½\\|", "p<0.1 / p>0.9"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for report in reports:
        rates, settings = report["learning_rates"], report["settings"]
        for row in report["rows"]:
            if row["method"] not in report["curves"]:
                continue  # only the adaptive rows: their schedule is what varies
            mask = row.get("mask")
            worst = min(row["accuracy"], key=row["accuracy"].get)
            declared = get_method(ROWS[row["method"]].method).params  # "—": a setting the method does not take

            def rate(name: str, value: float, declared: dict = declared) -> str:
                return f"{value:.3g}" if name in declared else "—"
            lines.append("| " + " | ".join([
                row["label"], settings["finetune"]["mode"], str(settings["steps"]), rate("lr", rates["coefficients"]),
                rate("mask_lr", rates["mask_logits"]), rate("inner_lr", rates["inner"]),
                ("yes" if settings["clamp"] else "no") if "clamp" in declared else "—",
                ",".join(map(str, report["seeds"])),
                _cell(row["average"], row.get("average_std")), f"{worst} {100 * row['accuracy'][worst]:.1f}",
                "" if mask is None else f"{mask['mean_abs_p_minus_half']:.3f}",
                "" if mask is None else
                f"{100 * mask['fraction_below_0.1']:.1f}% / {100 * mask['fraction_above_0.9']:.1f}%"]) + " |")
    lines += ["", *(provenance_line(r["provenance"], p) for r, p in zip(reports, args))]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# reference text from the code
# ---------------------------------------------------------------------------------------------
FAMILY_PAGES = {"static": "static-methods.md", "data": "data-aware-methods.md", "task-data": "data-aware-methods.md",
                "adaptive": "adaptive-methods.md"}


@renderer("methods")
def methods_table(args: list[str]) -> str:
    """`methods [PREFIX]`: every registered method, a row each (PREFIX: the link prefix to docs/, e.g. `docs/`)."""
    from pyfuse.methods import available_methods, get_method

    prefix = args[0] if args else ""
    kinds = {"static": "data-free", "data": "statistics", "task-data": "runs the models", "adaptive": "adaptive"}
    lines = ["| method | family | needs | merges | reference |", "| --- | --- | --- | --- | --- |"]
    for name in available_methods():
        cls = get_method(name)
        needs = ", ".join(cls.needs) or ("tasks' data" if cls.runs_tasks else "base + models")
        how = "fused op" if cls.fused else "streams" if cls.streams else "in memory" if not cls.learns else "learned"
        page = f"{prefix}{FAMILY_PAGES[cls.kind]}#method-{name}"
        lines.append(f"| [`{name}`]({page}) | {kinds[cls.kind]} | {needs} | {how} | {cls.reference or '—'} |")
    return "\n".join(lines)


@renderer("params")
def params_table(args: list[str]) -> str:
    """`params METHOD`: the method's declared parameters, defaults and help, from its registry entry."""
    from pyfuse.methods import get_method

    cls = get_method(args[0])
    lines = ["| parameter | default | meaning |", "| --- | --- | --- |"]
    for key, spec in cls.params.items():
        default = "required" if repr(spec.default) == "REQUIRED" else f"`{spec.default!r}`"
        meaning = spec.help.replace("|", r"\|")
        lines.append(f"| `{key}` | {default} | {meaning} |")
    return "\n".join(lines)


@renderer("help")
def command_help(args: list[str]) -> str:
    """`help COMMAND`: `pyfuse COMMAND --help` as printed at 100 columns (method list left out for merge)."""
    from pyfuse.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._subparsers._group_actions if isinstance(a, argparse._SubParsersAction))  # noqa: SLF001
    command = sub.choices[args[0]]
    command.epilog = None  # merge's epilog lists every method: the methods pages hold that
    columns = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"
    try:
        text = command.format_help()
    finally:
        if columns is None:
            os.environ.pop("COLUMNS")
        else:
            os.environ["COLUMNS"] = columns
    return "```text\n" + text.rstrip() + "\n```"

# ---------------------------------------------------------------------------------------------
# the benchmarks' JSONs (benchmarks/*.py --json): medians with their spread, ratios or why withheld
# ---------------------------------------------------------------------------------------------
Column = tuple[str, Callable[[dict[str, Any]], str]]


def markdown_table(rows: list[dict[str, Any]], columns: list[Column]) -> str:
    lines = ["| " + " | ".join(header for header, _ in columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(cell(row) for _, cell in columns) + " |" for row in rows]
    return "\n".join(lines)


def number(value: float | None) -> str:
    """Four significant digits; integers whole, with thousands separators; an empty cell for a missing value."""
    if value is None:
        return ""
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else f"{value:.4g}"


def timing(summary: dict[str, Any] | None, unit: str = "s") -> str:
    """A repeated timing (benchmarks/common.summary): the median, in `unit` (s or ms), and its spread."""
    if summary is None:
        return ""
    return f"{number(summary['median'] * {'s': 1, 'ms': 1e3}[unit])} {unit} ({100 * summary['spread']:.0f}%)"


def timed(key: str, unit: str = "s") -> Callable[[dict[str, Any]], str]:
    return lambda row: timing(row.get(key), unit)


def value(key: str, scale: float = 1.0) -> Callable[[dict[str, Any]], str]:
    return lambda row: number(row[key] * scale if scale != 1 and row.get(key) is not None else row.get(key))


def text(key: str) -> Callable[[dict[str, Any]], str]:
    return lambda row: "" if row.get(key) is None else str(row[key])


def ratio_of(key: str, unreliable: Callable[[dict[str, Any]], dict[str, Any]] = lambda row: {}
             ) -> Callable[[dict[str, Any]], str]:
    """A ratio cell: its value, "withheld" where the JSON holds it under unreliable_ratios, else empty."""
    def cell(row: dict[str, Any]) -> str:
        if row.get(key) is not None:
            return number(row[key])
        return "withheld" if key in unreliable(row) else ""
    return cell


def ratio_lines(ratios: dict[str, float | None], unreliable: dict[str, Any]) -> list[str]:
    """One bullet per ratio: its value, or `withheld: REASON` (the reason benchmarks/common.py gave)."""
    lines = [f"- `{key}`: {number(v)}" for key, v in ratios.items() if v is not None]
    lines += [f"- `{key}`: withheld: {entry['reason']}" for key, entry in unreliable.items()]
    return lines


def bench_sources(result: dict[str, Any], path: str) -> str:
    """The provenance line of a benchmark's JSON, with the load average before and after its run."""
    load = result.get("load") or {}
    record = {**result["provenance"], "load_average": load.get("load_before", result["provenance"].get(
        "load_average")), "load_average_after": load.get("load_after")}
    return provenance_line(record, path)


SPREAD_NOTE = ("Times: median over the timed repeats after a warm-up, (spread) = (max − min) / median; a ratio is "
               "withheld when the load or a spread makes it meaningless (docs/benchmarks.md).")


def bench_page(result: dict[str, Any], path: str, tables: list[str], ratios: dict[str, float | None] | None = None,
               unreliable: dict[str, Any] | None = None) -> str:
    """The tables, the ratios (or why withheld), the note on spreads and the provenance line."""
    parts = [*tables]
    lines = ratio_lines(ratios or {}, unreliable or {})
    if lines:
        parts.append("Ratios:\n\n" + "\n".join(lines))
    parts += [SPREAD_NOTE, bench_sources(result, path)]
    return "\n\n".join(parts)


def withheld_in_rows(rows: list[dict[str, Any]], prefix: Callable[[dict[str, Any]], str]) -> dict[str, Any]:
    """The rows' own unreliable_ratios, keyed `PREFIX KEY`."""
    return {f"{prefix(row)} {key}": entry for row in rows
            for key, entry in (row.get("unreliable_ratios") or {}).items()}


@renderer("bench-concrete-merge")
def bench_concrete_merge(args: list[str]) -> str:
    """`bench-concrete-merge FILE`: the fused op against the eager formula, and where the op's time goes."""
    result = load_result(args[0])
    rows = result["rows"]
    withheld = lambda row: row.get("unreliable_ratios") or {}  # noqa: E731
    main = markdown_table(rows, [
        ("impl", text("impl")), ("D", value("D")), ("vectors", text("dtype")), ("forward", timed("fwd", "ms")),
        ("forward+backward", timed("fwd_bwd", "ms")), ("extra peak MiB", value("extra_peak_mb")),
        ("forward GB/s", value("fwd_gbps")), ("copy_ GB/s", value("copy_gbps")),
        ("forward / copy_", ratio_of("fwd_frac_of_copy", withheld)),
        ("phases fwd / copy_", ratio_of("kernel_fwd_frac_of_copy", withheld)),
        ("phases bwd / copy_", ratio_of("kernel_bwd_frac_of_copy", withheld)),
        ("speed-up vs eager", ratio_of("fwd_bwd_speedup_vs_eager", withheld)),
        ("memory vs eager", value("extra_peak_vs_eager")),
        ("Philox alone / forward at 70 % of copy_", ratio_of("noise_share_of_fwd_budget", withheld))])
    phases = [{"impl": row["impl"], "D": row["D"], "phase": name, **t,
               "unreliable_ratios": {"frac_of_copy": withheld(row)[f"{name}_frac_of_copy"]}
               if f"{name}_frac_of_copy" in withheld(row) else {}} for row in rows
              for name, t in [*row["phases"].items(), ("copy_", {**row["copy"], "gbps": row["copy_gbps"]})]]
    phase_table = markdown_table(phases, [
        ("impl", text("impl")), ("D", value("D")), ("phase", text("phase")),
        ("time", lambda row: timing(row, "ms")), ("GB/s", value("gbps")),
        ("/ copy_", ratio_of("frac_of_copy", withheld))])
    return bench_page(result, args[0], [main, "Each phase alone, into existing buffers:\n\n" + phase_table],
                      unreliable=withheld_in_rows(rows, lambda row: f"{row['impl']} D={row['D']}"))


def step_table(results: dict[str, dict[str, Any]], label: str, columns: list[Column]) -> str:
    """One row per run of `results` ({name: figures}), its name in the first column."""
    return markdown_table([{"name": name, **r} for name, r in results.items()], [(label, text("name")), *columns])


def breakdown_table(results: dict[str, dict[str, Any]], label: str) -> str:
    """Where one profiled step's time goes, per run (`benchmarks/common.py:step_breakdown`), in seconds."""
    return "Where a step's time goes (one more step under `torch.profiler`, seconds):\n\n" + step_table(
        {name: r["breakdown"] for name, r in results.items()}, label, [
            ("op forward", value("op_forward")), ("op backward", value("op_backward")),
            ("optimiser", value("optimiser")), ("model forward and backward, rest", value("model_and_rest")),
            ("step", value("profiled_step_seconds"))])


@renderer("bench-concrete-step")
def bench_concrete_step(args: list[str]) -> str:
    """`bench-concrete-step FILE`: one Concrete AdaMerging outer step, pyfuse (fused) against the authors' (eager)."""
    result = load_result(args[0])
    table = step_table(result["results"], "impl", [
        ("backend", text("backend")), ("vectors", text("vector_dtype")), ("base in", text("base")),
        ("vectors in", text("vectors_in")),
        ("step", timed("step")), ("step CPU", timed("step_cpu")), ("peak RssAnon GiB", value("peak_rss_anon_gib")),
        ("VmHWM GiB", value("vmhwm_gib")), ("threads", text("threads"))])
    return bench_page(result, args[0], [table, breakdown_table(result["results"], "impl")], result.get("ratios"),
                      result.get("unreliable_ratios"))


@renderer("bench-lora-concrete")
def bench_lora_concrete(args: list[str]) -> str:
    """`bench-lora-concrete FILE`: a Concrete AdaMerging step on LoRA task vectors, dense against factored."""
    result = load_result(args[0])
    forms = {kind: result[kind] for kind in ("dense", "factored")}
    table = step_table(forms, "task vectors", [
        ("task-vector GiB", value("task_vector_bytes", 2**-30)), ("base in", text("base")),
        ("peak RssAnon GiB", value("peak_rss_anon_bytes", 2**-30)),
        ("step", timed("step")), ("step CPU", timed("step_cpu")), ("threads", text("threads"))])
    note = (f"{result['model']}. Largest difference of the merged parameters, factored against dense: "
            f"{number(result['max_rel_diff'])} (relative to the parameters).")
    return bench_page(result, args[0], [table, breakdown_table(forms, "task vectors"), note], result["ratios"],
                      result["unreliable_ratios"])


def _ratio_or_withheld(ratios: dict[str, Any], unreliable: dict[str, Any], key: str) -> str:
    if (ratios or {}).get(key) is not None:
        return number(ratios[key])
    entry = (unreliable or {}).get(key)
    return f"withheld ({entry['reason']})" if entry else ""


def _where(storage: str | None) -> str:
    return "on disk" if storage == "disk" else "in memory"


def _target_rows(result: dict[str, Any], path: str) -> list[dict[str, str]]:
    """The rows one benchmark JSON gives the targets table (see `bench_targets`)."""
    kind, threads = result["benchmark"], result["provenance"].get("threads")
    ratios, unreliable = result.get("ratios") or {}, result.get("unreliable_ratios") or {}
    source = f"`{Path(path).name}`"
    if kind == "concrete_step":
        fused = result["results"]["fused"]
        what = (f"one Concrete AdaMerging step, CLIP ViT-B/32, {result['config']['tasks']} {fused['vector_dtype']} "
                f"task vectors {_where(fused.get('vectors_in'))}, base {_where(fused.get('base'))}; pyfuse / the "
                f"authors' algorithm, {threads} thread(s)")
        return [{"what": f"{what}: peak RssAnon", "figure": _ratio_or_withheld(ratios, unreliable, "peak_rss_anon"),
                 "target": "≤ 0.30", "source": source},
                {"what": f"{what}: step time", "figure": _ratio_or_withheld(ratios, unreliable, "step_time"),
                 "target": "", "source": source}]
    if kind == "lora_concrete":
        what = f"LoRA task vectors factored / dense, Concrete AdaMerging step, {threads} thread(s)"
        return [{"what": f"{what}: step time", "figure": _ratio_or_withheld(ratios, unreliable, "step_seconds"),
                 "target": "≤ 1.0", "source": source},
                {"what": f"{what}: peak RssAnon", "figure": number(ratios.get("peak_rss_anon_bytes")),
                 "target": "≤ 0.45", "source": source}]
    if kind == "concrete_merge":
        rows, largest = [], max(r["D"] for r in result["rows"])
        for row in result["rows"]:
            if row["impl"] != "pyfuse-cpp" or row["D"] != largest:
                continue
            what = f"fused op (C++), D = {row['D'] / 1e6:.1f}M, {row['dtype']} task vectors, {threads} thread(s)"
            withheld = row.get("unreliable_ratios") or {}
            rows += [{"what": f"{what}: forward / `copy_` bandwidth",
                      "figure": _ratio_or_withheld(row, withheld, "fwd_frac_of_copy"), "target": "≥ 0.70",
                      "source": source},
                     {"what": f"{what}: fused backward / `copy_` bandwidth",
                      "figure": _ratio_or_withheld(row, withheld, "kernel_bwd_frac_of_copy"), "target": "≥ 0.60",
                      "source": source},
                     {"what": f"{what}: the Philox noise alone / the forward's time at 70 % of `copy_`",
                      "figure": _ratio_or_withheld(row, withheld, "noise_share_of_fwd_budget"),
                      "target": "(< 1 for ≥ 0.70 to be possible)", "source": source}]
        return rows
    raise ValueError(f"{path}: no targets for benchmark {kind!r}")


@renderer("bench-targets")
def bench_targets(args: list[str]) -> str:
    """`bench-targets FILE...`: the performance targets (issue 27) against the figures the benchmarks wrote."""
    results = [(path, load_result(path)) for path in args]
    table = markdown_table([row for path, result in results for row in _target_rows(result, path)], [
        ("measured", text("what")), ("ratio", text("figure")), ("target", text("target")), ("JSON", text("source"))])
    sources = "\n".join(f"- {bench_sources(result, path)}" for path, result in results)
    return f"{table}\n\n{sources}"


MERGE_COLUMNS: list[Column] = [
    ("run", text("run")), ("wall", timed("wall")), ("merge (median)", value("merge_s")),
    ("peak RssAnon MiB", value("peak_rss_anon_mib")), ("predicted MiB", value("predicted_peak_rss_anon_mib"))]


@renderer("bench-static-merge")
def bench_static_merge(args: list[str]) -> str:
    """`bench-static-merge FILE`: TIES (and the other static methods) as `pyfuse merge` processes, mergekit beside."""
    result = load_result(args[0])
    models = result["models"]
    tables = [f"Three Llama checkpoints of {models['parameters'] / 1e6:.1f}M parameters; TIES at density "
              f"{models['density']}:\n\n" + markdown_table(result["runs"], [
                  *MERGE_COLUMNS, ("memory vs mergekit", value("memory_vs_mergekit"))])]
    for key, title in (("sparse_runs", "Sparsify-and-consensus methods"), ("other_methods", "Other methods")):
        if result[key]:
            tables.append(f"{title}, the same checkpoints:\n\n" + markdown_table(result[key], MERGE_COLUMNS))
    return bench_page(result, args[0], tables, result["ratios"], result["unreliable_ratios"])


@renderer("bench-data-merges")
def bench_data_merges(args: list[str]) -> str:
    """`bench-data-merges FILE`: statistics and data-aware merges on a CLIP tower, or with `--embedded` the
    data-aware rows of the demo's accuracy table."""
    result = load_result(args[0])
    if "embedded" in result:
        return demo_markdown([result["embedded"]], [bench_sources(result, args[0])], args)
    statistics = markdown_table(result["statistics"], [
        ("statistics", text("kind")), ("per task", timed("timing")), ("peak RssAnon MiB", value("peak_mib")),
        ("extra MiB", value("extra_mib")), ("stored MiB / task", value("stored_mib_per_task"))])
    merges = markdown_table(result["merges"], [
        ("merge", text("merge")), ("time", timed("timing")), ("CPU s (first run)", value("cpu_seconds")),
        ("peak RssAnon MiB", value("peak_mib")), ("extra MiB", value("extra_mib")),
        ("max CG \\|r\\|/\\|b\\|", value("max_relative_residual"))])
    model = result["model"]
    head = (f"CLIP vision tower of {model['parameters'] / 1e6:.1f}M parameters, {result['config']['tasks']} tasks "
            f"(statistics: the spread is over the tasks):")
    return bench_page(result, args[0], [head, statistics, merges])


@renderer("bench-distributed")
def bench_distributed(args: list[str]) -> str:
    """`bench-distributed FILE`: a TIES merge and a Concrete AdaMerging step at world size 1 and 2, per rank."""
    result = load_result(args[0])
    tables = []
    if result["merge"]:
        tables.append("TIES merge (`torchrun`), per rank:\n\n" + markdown_table(result["merge"], [
            ("run", text("run")), ("rank", text("rank")), ("wall", timed("wall")), ("rank s", value("rank_s")),
            ("tensors", text("tensors")), ("read MiB", value("read_mib")),
            ("peak RssAnon MiB", value("peak_rss_anon_mib"))]))
    tables.append("Concrete AdaMerging outer step, per rank:\n\n" + markdown_table(result["concrete_step"], [
        ("run", text("run")), ("rank", text("rank")), ("step", timed("step")), ("shard elements", value("elements")),
        ("of D", value("elements_share")), ("task vectors MiB", value("task_vector_mib")),
        ("peak RssAnon MiB", value("peak_rss_anon_mib"))]))
    return bench_page(result, args[0], tables, result["ratios"], result["unreliable_ratios"])


@renderer("ablation")
def ablation_table(args: list[str]) -> str:
    """`ablation FILE`: the Concrete AdaMerging ablations (benchmarks/ablate_concrete_am.py), mean ± sample std
    over seeds, each variant with the settings it ran."""
    result = load_result(args[0])
    summary = result["summary"]
    tasks = list(summary[0]["accuracy"])
    variants = result["variants"]

    def settings(row: dict[str, Any]) -> str:
        v = variants[row["variant"]]
        common = f"clamp {'on' if v['clamp'] else 'off'}, lr {number(v['lr'])}, {v['steps']} steps"
        if v["method"] == "adamerging":  # no mask, no inner step
            return f"AdaMerging: {common}"
        return (f"inner {v['inner_optimizer']} {number(v['inner_lr'])}, {common}, mask lr {number(v['mask_lr'])}, "
                f"T {number(v['temperature'])}")

    table = markdown_table(summary, [
        ("variant", text("variant")), ("eval mask", text("eval_mask")), ("settings", settings),
        *((task, lambda row, task=task: _cell(row["accuracy"][task], None)) for task in tasks),
        ("avg", lambda row: _cell(row["average"], row["average_std"])),
        ("max class share", value("max_class_share")), ("time / seed", lambda row: _seconds(row["seconds"]))])
    seeds = ",".join(map(str, result["seeds"]))
    return (f"{table}\n\nTest accuracy (%), mean over seeds {seeds} (avg: ± sample std over seeds).\n\n"
            f"{bench_sources(result, args[0])}")



def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 listing the files that differ")
    args = parser.parse_args(argv)
    from pyfuse.io.atomic import atomic_path

    stale = []
    for path in documents():
        text = path.read_text()
        rendered = render_text(text, path)
        if rendered != text:
            stale.append(path.relative_to(ROOT))
            if not args.check:
                with atomic_path(path) as tmp:  # a failed write leaves the document as it was
                    tmp.write_text(rendered)
    if args.check and stale:
        print("out of date (run `make docs`): " + ", ".join(map(str, stale)), file=sys.stderr)
        return 1
    print(("rewrote: " + ", ".join(map(str, stale))) if stale and not args.check else "docs: up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
