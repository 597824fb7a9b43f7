"""NVTX ranges (domain "pyfuse"): the ranges a tiny adaptive run and a tiny streaming merge open, their names and
how they nest, recorded with `pyfuse.ops.profiling.record_ranges` (docs/profiling.md lists them)."""

from __future__ import annotations

from collections import Counter

import torch
from safetensors.torch import save_file

import pyfuse
from pyfuse.adaptive.loop import AdaptiveLoop, RunOptions, Settings
from pyfuse.ops.profiling import nvtx_range, record_ranges, timed_range

from .adaptive_helpers import CLIP_TASKS, clip_problem

META, INNER, ADAPT = 2, 2, 3


def test_record_ranges_sees_nesting_per_thread_and_timed_range_times():
    import threading

    seconds: dict[str, float] = {}
    with record_ranges() as recorder:
        with timed_range("outer", seconds, "outer_s"), nvtx_range("inner"):
            worker = threading.Thread(target=lambda: nvtx_range("elsewhere").__enter__())
            worker.start()
            worker.join()
        with nvtx_range("after"):
            pass
    assert recorder.paths == [("outer",), ("outer", "inner"), ("elsewhere",), ("after",)]
    assert set(seconds) == {"outer_s"} and seconds["outer_s"] >= 0
    with nvtx_range("unrecorded"):
        pass
    assert "unrecorded" not in recorder.names


def test_an_adaptive_run_opens_a_range_per_phase_task_and_optimizer():
    model, tv, tasks = clip_problem()
    settings = Settings(method="concrete_adamerging", coefficients="layer", meta_steps=META, inner_steps=INNER,
                        adapt_steps=ADAPT, eval_mask="relaxed")
    with record_ranges() as recorder:
        AdaptiveLoop(model, tv, tasks, settings, RunOptions(progress=False, backend="reference", eval_every=1)).run()
    paths = Counter(recorder.paths)
    run = ("adaptive.run",)
    outer, adapt = (*run, "adaptive.outer_step"), (*run, "adaptive.adapt_step")
    inner = (*outer, "adaptive.inner_step")
    assert paths[outer] == META and paths[inner] == META * INNER and paths[adapt] == ADAPT
    passes = {inner: META * INNER, outer: META, adapt: ADAPT}  # one merge, forward, backward per pass
    for where, count in passes.items():
        assert paths[(*where, "adaptive.merge")] == count
        assert paths[(*where, "adaptive.merge", "concrete_merge.forward")] == count
        assert paths[(*where, "adaptive.fused_backward")] == count
        assert paths[(*where, "adaptive.fused_backward", "concrete_merge.backward")] == count
        for task in CLIP_TASKS:
            assert paths[(*where, f"adaptive.forward:{task}")] == count
            assert paths[(*where, f"adaptive.backward:{task}")] == count
    assert paths[(*inner, "adaptive.optimizer:inner")] == META * INNER
    assert paths[(*outer, "adaptive.optimizer:mask")] == META
    assert paths[(*adapt, "adaptive.optimizer:adapt")] == ADAPT
    # eval_every=1: before the run, after every step but the last, and the final evaluation
    assert paths[(*run, "adaptive.evaluate")] == 1 + (META + ADAPT - 1) + 1
    assert all(path[0] == "adaptive.run" for path in recorder.paths)
    ours = {name.split(":")[0] for name in recorder.names}
    assert ours <= {"adaptive.run", "adaptive.outer_step", "adaptive.inner_step", "adaptive.adapt_step",
                    "adaptive.merge", "adaptive.forward", "adaptive.backward", "adaptive.fused_backward",
                    "adaptive.optimizer", "adaptive.evaluate", "concrete_merge.forward", "concrete_merge.mask_sums",
                    "concrete_merge.merge_apply", "concrete_merge.backward", "concrete_merge.backward_accumulate",
                    "concrete_merge.backward_logits", "concrete_merge.sample_uniform",
                    "concrete_merge.sample_mask"}, ours


def test_a_streaming_merge_opens_read_merge_and_write_ranges_per_tensor(tmp_path):
    generator = torch.Generator().manual_seed(0)
    base = {"a.weight": torch.randn(8, 4, generator=generator), "b.weight": torch.randn(16, generator=generator),
            "steps": torch.arange(3)}
    models = [{k: v + 0.1 * (i + 1) if v.is_floating_point() else v for k, v in base.items()} for i in range(2)]
    paths = []
    for name, state in (("base", base), ("m0", models[0]), ("m1", models[1])):
        save_file(state, str(tmp_path / f"{name}.safetensors"))
        paths.append(tmp_path / f"{name}.safetensors")
    with record_ranges() as recorder:
        pyfuse.merge_to_dir("ties", paths[0], paths[1:], tmp_path / "out", threads=1, density=0.5)
    found = Counter(recorder.paths)
    assert found[("engine.hash",)] == 1 and found[("engine.prepare",)] == 1
    write = ("engine.merge_write",)
    for name in ("a.weight", "b.weight", "steps"):
        tensor = (*write, f"engine.tensor:{name}")
        assert found[tensor] == 1
        assert found[(*tensor, "engine.write")] >= 1
        merged = name != "steps"  # an integer tensor is carried from the base: not read for merging
        assert (found[(*tensor, "engine.read")] >= 1) == merged and (found[(*tensor, "engine.merge")] >= 1) == merged
    # while writing, every chunk read is merged once; TIES' global pass (its trim thresholds) reads beforehand
    reads = sum(count for path, count in found.items() if path[-1] == "engine.read" and path[0] == write[0])
    merges = sum(count for path, count in found.items() if path[-1] == "engine.merge")
    assert reads == merges >= 2
    assert found[("engine.prepare", "engine.read")] >= 2
