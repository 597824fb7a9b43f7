"""`benchmarks/gpu_check.py` in its dry mode (tiny sizes on the CPU): every section runs end to end and the JSON
holds what a GPU run must report; a failed check or a section that raises makes it exit 1 without losing the
other sections' figures."""

from __future__ import annotations

import datetime
import importlib.util
import json
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def _script():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_dry_run_exercises_every_section_and_reports_them(tmp_path):
    out = tmp_path / "gpu_check.json"
    assert _script().main(["--dry-run", "--repeats", "1", "--json", str(out), "--commit", "abc123"]) == 0
    result = json.loads(out.read_text())
    origin = result["provenance"]
    assert origin["dry_run"] and origin["commit"] == "abc123" and origin["device"].startswith("cpu")
    assert origin["torch"] == torch.__version__ and origin["triton"] and "--dry-run" in origin["command"]
    assert datetime.datetime.fromisoformat(origin["date"]).tzinfo is not None
    tests = result["op_tests"]
    # dense (layer- and task-wise coefficients) and factored LoRA, fp32 and bf16 storage, two masks, rescale or not
    assert tests["count"] == 2 * 2 * 2 * 3 and tests["passed"] and tests["failed"] == 0
    assert {(c["vectors"], c["dtype"]) for c in tests["cases"]} == {
        (kind, dtype) for kind in ("dense", "lora") for dtype in ("float32", "bfloat16")}
    timing = result["op_timing"]
    for key in ("fused_fwd_ms", "fused_fwd_bwd_ms", "eager_fwd_ms", "eager_fwd_bwd_ms", "copy_gbps",
                "fused_fwd_gbps"):
        assert timing[key] > 0, key
    assert timing["fused_fwd_frac_of_copy"] == timing["fused_fwd_gbps"] / timing["copy_gbps"]
    assert timing["fwd_bytes"] == timing["copy_bytes"] or abs(timing["fwd_bytes"] - timing["copy_bytes"]) < 8
    assert set(timing["targets"]) == {"fwd_frac_of_copy", "fwd_bwd_speedup", "fwd_frac_met", "fwd_bwd_speedup_met"}
    loop = result["loop"]
    assert loop["agree"] and loop["steps"] == 10 and loop["tasks"] == 3
    assert loop["device_backend"] == "reference" and loop["cpu_backend"] in ("cpp", "reference")
    assert 0 <= loop["max_abs_diff"] <= loop["tolerance"]["atol"]
    assert len(loop["entropy_device"]) == len(loop["entropy_cpu"]) == 10
    assert result["passed"] and set(result["seconds"]) == {"op_tests", "op_timing", "loop", "total"}


def test_a_failed_check_or_a_raising_section_fails_the_run_and_keeps_the_rest(tmp_path, monkeypatch):
    script = _script()
    monkeypatch.setattr(script, "LOOP_ATOL", 0.0)  # the reference and C++ runs differ by float32 rounding
    monkeypatch.setattr(script, "LOOP_RTOL", 0.0)

    def broken(*args):
        raise RuntimeError("no kernel image is available")

    monkeypatch.setattr(script, "op_timing", broken)
    out = tmp_path / "gpu_check.json"
    assert script.main(["--dry-run", "--sections", "op_timing,loop", "--json", str(out)]) == 1
    result = json.loads(out.read_text())
    assert result["op_timing"]["error"] == "RuntimeError: no kernel image is available"
    assert not result["loop"]["agree"] and result["loop"]["max_abs_diff"] > 0
    assert not result["passed"] and "op_tests" not in result


def test_make_gpu_check_installs_without_dependencies_and_carries_wheels():
    recipe = (ROOT / "Makefile").read_text().split("\ngpu-check:")[1].split("\n\n")[0]
    assert "pip install --quiet --no-deps --no-build-isolation -e ." in recipe.replace("$(PIP)", "pip")
    assert "--no-index --no-deps wheels/*.whl" in recipe and "benchmarks/gpu_check.py" in recipe
