"""Where and how a result was produced: command, commit, UTC date, CPU, cores, threads, versions, load.

Every JSON that a table in the docs is rendered from (the demo's report, the benchmarks') carries this record, so
a figure can always be traced to the code and the machine that produced it.
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

_ROOT = Path(__file__).resolve().parent.parent


def git_commit(root: str | os.PathLike = _ROOT) -> str | None:
    """HEAD of the checkout at `root` (`+dirty` when tracked files differ from it); None outside a checkout."""
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (the platform's processor name elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> float:
    """The 1-minute load average (runnable and waiting tasks, all of the machine)."""
    return os.getloadavg()[0]


def command_line() -> str:
    """The command as typed: `python -m pyfuse demo ...` for a module run (whose argv[0] is its __main__.py)."""
    words = list(getattr(sys, "orig_argv", sys.argv))
    if words and (words[0] == sys.executable or os.path.basename(words[0]).startswith("python")):
        words[0] = "python"
    return " ".join(words)


def provenance(threads: int | None = None) -> dict:
    """The record: `command`, `commit`, `date` (UTC), `cpu_model`, `cores`, `threads` (torch's when None),
    `torch`, `python`, `platform` and `load_average` (1 minute, when the record is taken)."""
    return {
        "command": command_line(),
        "commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu_model": cpu_model(), "cores": os.cpu_count(),
        "threads": torch.get_num_threads() if threads is None else threads,
        "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
        "load_average": load_average(),
    }
