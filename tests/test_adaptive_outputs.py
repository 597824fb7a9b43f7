"""What a run leaves behind: the merged model (from_pretrained-loadable), the mask, the JSON report and its
plot; and `run_from_config`, the entry `pyfuse merge` calls for the adaptive methods."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import CLIPVisionModel

from pyfuse.adaptive import load_report, plot_report
from pyfuse.config import run_from_config

from .adaptive_helpers import CLIP_TASKS, DIGIT_TASKS, digits_models, save_clip_dirs

RUN = {"progress": False, "backend": "reference", "eval_every": 1}


@pytest.fixture(scope="module")
def clip_dirs(tmp_path_factory):
    """The tiny CLIP tower and its 'fine-tuned' versions saved as Hugging Face model directories."""
    return save_clip_dirs(tmp_path_factory.mktemp("clip"))


def _clip_config(root, method, params):
    return {
        "method": method,
        "base": str(root / "base"),
        "models": {name: str(root / name) for name in CLIP_TASKS},
        "tasks": {name: {"factory": "tests.adaptive_helpers:clip_task", "kwargs": {"name": name}}
                  for name in CLIP_TASKS},
        "vector_dtype": "bfloat16",
        "parameters": params,
        "run": RUN,
    }


def test_concrete_adamerging_from_config_writes_loadable_outputs(clip_dirs, tmp_path):
    config = _clip_config(clip_dirs, "concrete_adamerging",
                          {"granularity": "layer", "meta_steps": 2, "adamerging_steps": 2, "eval_mask": "hard",
                           "seed": 5})
    result = run_from_config(config, tmp_path / "out", trust_code=True)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "mask.safetensors", "merged", "report.json"]

    loaded = CLIPVisionModel.from_pretrained(out / "merged")
    for name, tensor in loaded.state_dict().items():
        if name in result.state_dict:
            assert torch.equal(tensor, result.state_dict[name]), name

    mask = load_file(out / "mask.safetensors")
    layout_names = list(result.state_dict)
    assert set(mask) <= set(layout_names)
    flat = torch.cat([mask[name].flatten() for name in layout_names if name in mask])
    assert torch.equal(flat, result.logits)

    report = load_report(out / "report.json")
    assert report["eval_mask"]["mode"] == "hard" and report["eval_mask"]["seed"] == 5
    assert report["vector_dtype"] == "torch.bfloat16"
    assert [p["name"] for p in report["phases"]] == ["meta", "adapt"]
    assert report["accuracy"]["step"] == [0, 1, 2, 3, 4]
    assert set(report["accuracy"]["tasks"]) == set(CLIP_TASKS)
    assert report["entropy"]["step"] == [1, 2, 3, 4]
    assert report["final_accuracy"] == {name: report["accuracy"]["tasks"][name][-1] for name in CLIP_TASKS}

    png = plot_report(out / "report.json")
    assert png == out / "report.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_config_with_an_architecture_callable_saves_plain_safetensors(tmp_path):
    base, finetuned = digits_models()
    save_file(base, tmp_path / "base.safetensors")
    models = {}
    for name, state in zip(DIGIT_TASKS, finetuned):
        save_file(state, tmp_path / f"{name}.safetensors")
        models[name] = str(tmp_path / f"{name}.safetensors")
    config = {
        "method": "adamerging",
        "base": str(tmp_path / "base.safetensors"),
        "models": [{"name": name, "path": path} for name, path in models.items()],
        "architecture": "tests.adaptive_helpers:digits_architecture",
        "tasks": {name: {"factory": "tests.adaptive_helpers:digits_task", "kwargs": {"name": name}}
                  for name in DIGIT_TASKS},
        "parameters": {"granularity": "task", "steps": 3, "lr": 0.05},
        "run": RUN,
    }
    result = run_from_config(config, tmp_path / "out", trust_code=True)
    saved = load_file(tmp_path / "out" / "merged" / "model.safetensors")
    assert saved.keys() == result.state_dict.keys()
    for name, tensor in saved.items():
        assert torch.equal(tensor, result.state_dict[name])
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["eval_mask"] is None and report["method"] == "adamerging"
    assert len(report["coefficients"]) == len(DIGIT_TASKS)


@pytest.mark.parametrize("change, message", [
    ({"method": "ties"}, "not adaptive"),
    ({"tasks": {"cars": "tests.adaptive_helpers:clip_task"}}, "tasks must map the model names"),
    ({"parameters": {"granularity": "layer", "stepz": 3}}, "stepz"),
    ({"vector_dtype": "int8"}, "vector_dtype"),
    ({"run": {"resume": True}}, "unknown key"),
    ({"extra": 1}, "unknown key 'extra'"),
])
def test_config_errors_name_the_offending_entry(clip_dirs, tmp_path, change, message):
    config = {**_clip_config(clip_dirs, "adamerging", {"steps": 1}), **change}
    with pytest.raises(ValueError, match=message):
        run_from_config(config, tmp_path / "out", trust_code=True)


def test_task_factory_must_return_a_task_of_that_name(clip_dirs, tmp_path):
    config = _clip_config(clip_dirs, "adamerging", {"steps": 1})
    config["tasks"]["cars"] = {"factory": "tests.adaptive_helpers:clip_task", "kwargs": {"name": "dtd"}}
    with pytest.raises(ValueError, match="returned a task named 'dtd'"):
        run_from_config(config, tmp_path / "out", trust_code=True)


def test_cli_runs_an_adaptive_merge_and_plots_it(clip_dirs, tmp_path, capsys):
    import yaml

    from pyfuse.cli import main

    config = _clip_config(clip_dirs, "concrete_task_arithmetic", {"steps": 2, "seed": 1})
    # paths relative to the config file, as users write them
    config["base"] = "base"
    config["models"] = {name: name for name in CLIP_TASKS}
    path = clip_dirs / "concrete_ta.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["merge", str(path), str(tmp_path / "out"), "--trust-code"]) == 0
    assert "average" in capsys.readouterr().out
    assert CLIPVisionModel.from_pretrained(tmp_path / "out" / "merged") is not None
    assert main(["plot", str(tmp_path / "out" / "report.json"), "-o", str(tmp_path / "curves.png")]) == 0
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["merge", str(path), str(tmp_path / "dry"), "--dry-run"]) == 1
    assert "--dry-run is for the static methods" in capsys.readouterr().err


@pytest.mark.parametrize("chunk", [3, 1 << 22])
def test_mask_movement_matches_a_float64_rederivation(chunk):
    from pyfuse.adaptive.loop import mask_movement

    logits = torch.randn(1001, generator=torch.Generator().manual_seed(0)) * 3
    p = [1 / (1 + math.exp(-x)) for x in logits.double().tolist()]
    moved = mask_movement(logits, chunk=chunk)
    assert moved["mean_probability"] == pytest.approx(sum(p) / len(p), abs=1e-12)
    assert moved["mean_abs_p_minus_half"] == pytest.approx(sum(abs(q - 0.5) for q in p) / len(p), abs=1e-12)
    assert moved["fraction_below_0.1"] == sum(q < 0.1 for q in p) / len(p)
    assert moved["fraction_above_0.9"] == sum(q > 0.9 for q in p) / len(p)
    assert moved["max_abs_logit"] == float(logits.abs().max())
