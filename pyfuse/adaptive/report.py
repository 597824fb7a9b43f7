"""The JSON report of an adaptive merge, and its plot: accuracy and summed entropy versus step."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..io.atomic import atomic_path


def write_report(path: str | os.PathLike, report: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(report, indent=1))


def load_report(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    try:
        report = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not a JSON report ({err})") from None
    missing = [key for key in ("method", "entropy", "accuracy") if key not in report]
    if missing:
        raise ValueError(f"{path}: not a pyfuse adaptive-merging report (missing {missing})")
    return report


def plot_report(report_path: str | os.PathLike, png_path: str | os.PathLike | None = None) -> Path:
    """Draw accuracy per task (and their average) and the summed entropy versus step into a PNG.

    The PNG goes to `png_path`, by default beside the report with the suffix `.png`; returns its path.
    """
    # The Agg canvas directly, so plotting never touches the caller's pyplot backend or figures.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    report = load_report(report_path)
    png = Path(png_path) if png_path is not None else Path(report_path).with_suffix(".png")
    figure = Figure(figsize=(9, 7), layout="constrained")
    FigureCanvasAgg(figure)
    acc_ax, ent_ax = figure.subplots(2, 1, sharex=True)

    accuracy = report["accuracy"]
    if accuracy["step"]:
        for name, values in accuracy["tasks"].items():
            if values:
                acc_ax.plot(accuracy["step"], [100 * v for v in values], marker=".", linewidth=1, label=name)
        acc_ax.plot(accuracy["step"], [100 * v for v in accuracy["average"]], color="black", linewidth=2.5,
                    label="average")
        acc_ax.legend(fontsize="small", ncol=2)
    else:
        acc_ax.text(0.5, 0.5, "no labelled test data", ha="center", va="center", transform=acc_ax.transAxes)
    acc_ax.set_ylabel("test accuracy (%)")

    entropy = report["entropy"]
    ent_ax.plot(entropy["step"], entropy["value"], linewidth=1)
    ent_ax.set_ylabel("entropy, summed over tasks")
    ent_ax.set_xlabel("step")

    start = 0
    for phase in report.get("phases", [])[:-1]:
        start += phase["steps"]
        for ax in (acc_ax, ent_ax):
            ax.axvline(start, color="grey", linestyle="--", linewidth=1)
    mask = report.get("eval_mask")
    title = report["method"] + (f" (evaluation mask: {mask['mode']}, seed {mask['seed']})" if mask else "")
    acc_ax.set_title(title)
    for ax in (acc_ax, ent_ax):
        ax.grid(alpha=0.3)
    with atomic_path(png) as tmp:
        figure.savefig(tmp, format="png", dpi=110)
    return png
