"""benchmarks/ablate_concrete_am.py: every variant runs with exactly the settings its table entry names (none taken
from the demo's defaults, which change), the learning rates resolved from the movements over the schedule."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from .bench_helpers import load_benchmark


def _load():
    return load_benchmark("ablate_concrete_am")


class _RecordingLoop:
    """Stands in for AdaptiveLoop: records the Settings each run is given."""

    seen: list = []

    def __init__(self, module, vectors, tasks, settings, options):
        _RecordingLoop.seen.append(settings)
        self.merger = SimpleNamespace(logits=torch.zeros(4))

    def run(self):
        return SimpleNamespace(coefficients=torch.zeros(2, 3), logits=torch.zeros(4), state_dict={},
                               report={"final_average": 0.5, "final_class_share": {"a": 0.5},
                                       "entropy": {"value": [1.0]}})


@pytest.mark.parametrize("name", list(_load().VARIANTS))
def test_each_variant_runs_with_the_settings_it_names(name, monkeypatch):
    ablation = _load()
    monkeypatch.setattr(ablation, "AdaptiveLoop", _RecordingLoop)
    monkeypatch.setattr(ablation, "_final", lambda ctx, result, tasks: {"accuracy": {"a": 0.5}, "average": 0.5})
    # the demo's defaults here differ from every variant's own (inner 0.1 Adam, clamp True, 30 steps): none may leak
    ctx = SimpleNamespace(settings=SimpleNamespace(steps=30, inner_lr=0.123, clamp=True, temperature=0.77),
                          adaptation=lambda seed: ["task"], task_vectors=lambda: "vectors",
                          encoder=SimpleNamespace(module=None))
    _RecordingLoop.seen = []
    method, named, _ = ablation.VARIANTS[name]
    assert set(ablation.SETTINGS) <= set(named)
    assert ("lr" in named) != ("lr_movement" in named) and ("mask_lr" in named) != ("mask_movement" in named)
    rows = ablation.run_variant(ctx, name, seed=3, backend="reference", eval_masks={"relaxed"})
    steps = named.get("steps", 30)
    lr = named["lr"] if "lr" in named else named["lr_movement"] / steps
    mask_lr = named["mask_lr"] if "mask_lr" in named else named["mask_movement"] / steps
    runs = _RecordingLoop.seen
    assert all(s.method == method and s.seed == 3 and s.clamp == named["clamp"] and s.coefficients == "layer"
               and s.lr == pytest.approx(lr) for s in runs)
    if method == "adamerging":
        assert [s.adapt_steps for s in runs] == [steps]
    else:  # the meta phase, then AdaMerging under the learned mask
        meta, phase2 = runs
        assert (meta.meta_steps, meta.inner_steps, phase2.adapt_steps) == (steps, 1, steps)
        assert meta.inner_lr == named["inner_lr"] and meta.inner_optimizer == named["inner_optimizer"]
        assert meta.mask_lr == pytest.approx(mask_lr)
        assert meta.temperature == phase2.temperature == named["temperature"]
        assert phase2.eval_mask == "relaxed"
    assert rows[0]["inner_lr"] == named["inner_lr"] and rows[0]["steps"] == steps


def test_rows_labelled_inner_adam_1_run_inner_adam_1():
    schedule = _load().variant_schedule("authors_fusion_bench", 30)
    assert (schedule["inner_optimizer"], schedule["inner_lr"], schedule["clamp"]) == ("adam", 1.0, False)
    assert schedule["lr"] == pytest.approx(1 / 30) and schedule["mask_lr"] == pytest.approx(2 / 30)
    assert _load().variant_schedule("language", 30)["inner_lr"] == 0.1


def test_unknown_variant_is_refused_before_any_work(capsys):
    with pytest.raises(SystemExit):
        _load().main(["--variants", "clamp,no_such_variant"])
    assert "no_such_variant" in capsys.readouterr().err
