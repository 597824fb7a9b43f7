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
import subprocess
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


def render_text(text: str, where: str = "<text>") -> str:
    """`text` with every generated part re-rendered."""
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
def load_result(path: str) -> dict[str, Any]:
    file = DOCS / path
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no such result file (run the command its table names)")
    return json.loads(file.read_text())


def head_commit() -> str | None:
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def provenance_line(record: dict[str, Any], path: str) -> str:
    """One line saying where a table's figures come from; it says so when they are from a modified tree."""
    commit = record.get("commit") or "unknown commit"
    short = commit[:7] + (" (uncommitted changes)" if commit.endswith("+dirty") else "")
    load = record.get("load_average")
    after = record.get("load_average_after")
    loads = "" if load is None else f", load {load:.1f}" + ("" if after is None else f"→{after:.1f}")
    return (f"<sub>Source: [`{path}`]({path if path.startswith('..') else path}) — `{record.get('command')}`; "
            f"commit {short}, {record.get('date', '?')[:10]}, {record.get('cpu_model', '?')}, "
            f"{record.get('cores', '?')} cores, {record.get('threads', '?')} threads{loads}, "
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
    first = reports[0]
    tasks = [t["name"] for t in first["tasks"]]
    rows: dict[str, dict[str, Any]] = {}
    for report in reports:
        if [t["name"] for t in report["tasks"]] != tasks or report["finetuned"].keys() != first["finetuned"].keys():
            raise ValueError(f"{args}: the reports are of different tasks")
        for row in report["rows"]:
            rows.setdefault(row["method"], row)
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
    settings = first["settings"]
    seeds = ",".join(map(str, first["seeds"]))
    lines += ["", f"Test accuracy (%), fine-tuning `{settings['finetune']['mode']}` (seed {first['finetune_seed']}), "
              f"adaptation seeds {seeds} (stochastic rows: mean ± sample std over seeds), "
              f"{settings['steps']}-step adaptive schedules."]
    lines += ["", *(provenance_line(r["provenance"], p) for r, p in zip(reports, args))]
    return "\n".join(lines)


@renderer("schedules")
def schedules_table(args: list[str]) -> str:
    """`schedules FILE [FILE...]`: the adaptive rows of several demo reports, one setting per report (its steps,
    learning rates, inner lr, clamp), with accuracy over seeds and how far the learned mask moved."""
    from pyfuse.demo import ROWS
    from pyfuse.methods import get_method

    reports = [load_result(path) for path in args]
    header = ["method", "steps", "lr", "mask lr", "inner lr", "clamp", "seeds", "avg", "worst task",
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
                row["label"], str(settings["steps"]), rate("lr", rates["coefficients"]),
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 listing the files that differ")
    args = parser.parse_args(argv)
    stale = []
    for path in documents():
        text = path.read_text()
        rendered = render_text(text, str(path.relative_to(ROOT)))
        if rendered != text:
            stale.append(path.relative_to(ROOT))
            if not args.check:
                path.write_text(rendered)
    if args.check and stale:
        print("out of date (run `make docs`): " + ", ".join(map(str, stale)), file=sys.stderr)
        return 1
    print(("rewrote: " + ", ".join(map(str, stale))) if stale and not args.check else "docs: up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
