"""Smoke test of benchmarks/bench_lora_concrete.py at a tiny size: the JSON's required keys, task-vector bytes that
follow from the shapes, and the two forms' merged parameters agreeing (with the base on disk)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_lora_concrete.py"
HIDDEN, LAYERS, TASKS, RANK = 64, 2, 3, 4


def test_tiny_run_writes_the_required_figures(tmp_path, disk_path):
    out = tmp_path / "bench.json"
    command = [sys.executable, str(SCRIPT), "--tasks", str(TASKS), "--rank", str(RANK), "--hidden", str(HIDDEN),
               "--mlp", "96", "--layers", str(LAYERS), "--heads", "4", "--vocab", "32", "--batch", "1", "--seq", "4",
               "--steps", "1", "--base-on-disk", str(disk_path), "--json", str(out)]
    subprocess.run(command, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    result = json.loads(out.read_text())
    keys = {"task_vector_bytes", "peak_rss_anon_bytes", "step_seconds"}
    assert keys <= set(result["dense"]) and keys <= set(result["factored"])
    D = 4 * LAYERS * HIDDEN * HIDDEN
    assert result["dense"]["merged_parameters"] == result["factored"]["merged_parameters"] == D
    assert result["dense"]["task_vector_bytes"] == TASKS * D * 4  # fp32 [n, D]
    # per q/k/v/o tensor and task: A [r, in] and B [out, r] in fp32, plus the per-component tables (int64, fp32)
    tensors, components = 4 * LAYERS, 4 * LAYERS * TASKS * RANK
    factors = components * 2 * HIDDEN * 4
    tables = tensors * 8 + (tensors + 1) * 8 + components * (8 + 4)
    assert result["factored"]["task_vector_bytes"] == factors + tables
    assert 0 <= result["max_rel_diff"] <= 1e-5
    assert result["dense"]["base"] == result["factored"]["base"] == "disk"
    assert all(result[k]["peak_rss_anon_bytes"] > 0 and result[k]["step_seconds"] > 0 for k in ("dense", "factored"))
