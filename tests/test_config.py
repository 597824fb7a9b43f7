"""One config format for every method: `pyfuse.config.check_config` validates it whole, before any work."""

from __future__ import annotations

from pathlib import Path

import pytest

from pyfuse.cli import main
from pyfuse.config import ConfigError, check_config
from pyfuse.methods.adaptive import ConcreteAdaMerging

TASKS = {"a": "tests.adaptive_helpers:digits_task", "b": "tests.adaptive_helpers:digits_task"}


def _adaptive(**change):
    return {"method": "concrete_adamerging", "base": "base", "models": {"a": "a", "b": "b"}, "tasks": TASKS,
            **change}


def test_static_and_adaptive_configs_share_keys_and_shapes(tmp_path):
    static = check_config({"method": "ties", "base": "base", "models": {"a": "a", "b": "b"},
                           "parameters": {"density": 0.5}}, "merge.yaml", tmp_path)
    assert static.models == [tmp_path / "a", tmp_path / "b"] and static.names == ["a", "b"]
    assert static.method.config["density"] == 0.5 and not static.adaptive
    adaptive = check_config(_adaptive(models=[{"name": "a", "path": "a"}, {"name": "b", "path": "b"}],
                                      parameters={"temperature": 0.25, "meta_steps": 3}))
    assert adaptive.adaptive and adaptive.names == ["a", "b"] and adaptive.models == ["a", "b"]
    assert isinstance(adaptive.method, ConcreteAdaMerging)
    # every parameter not given takes the default its Param declares
    assert adaptive.method.config == {**{k: p.default for k, p in ConcreteAdaMerging.params.items()},
                                      "temperature": 0.25, "meta_steps": 3}


@pytest.mark.parametrize("config, message", [
    (_adaptive(params={"meta_steps": 3}), "'params' is now 'parameters'"),
    (_adaptive(parameters={"temperature": 0}), "concrete_adamerging: temperature must be > 0, got 0"),
    ({"method": "concrete", "base": "b", "models": ["a"], "parameters": {"temperature": 0.0, "mask": "none"}},
     "concrete: temperature must be > 0"),
    (_adaptive(parameters={"eval_mask": "none"}), "eval_mask must be one of"),
    (_adaptive(dtype="bfloat16"), "'dtype' is for static and data-aware methods, not concrete_adamerging"),
    ({"method": "ties", "base": "b", "models": ["a"], "tasks": TASKS},
     "'tasks' is for methods that run the model on tasks \\(adaptive ones, regmean\\+\\+\\), not ties"),
    ({"method": "ties", "base": "b", "models": ["a"], "run": {}}, "'run' is for adaptive methods, not ties"),
    ({"method": "regmean++", "base": "b", "models": ["a"], "tasks": TASKS},
     "models of regmean\\+\\+ need distinct task names"),
    (_adaptive(models=["a", "b"]), "need distinct task names"),
    (_adaptive(models=[{"name": "a", "path": "a", "weight": 2}, {"name": "b", "path": "b"}]), "give no 'weight'"),
    (_adaptive(run={"resume": True}), r"run has unknown key\(s\) \['resume'\]"),
])
def test_errors_name_the_key_before_any_work(config, message):
    with pytest.raises(ConfigError, match=message):
        check_config(config)


def test_merge_help_lists_every_method_with_its_parameters(capsys):
    with pytest.raises(SystemExit):
        main(["merge", "--help"])
    out = capsys.readouterr().out
    for line in ("concrete_adamerging: ", "inner_lr (1.0)", "adamerging++: ", "density (0.2)",
                 "concrete_task_arithmetic: ", "temperature (0.5)", "adamerging: ", "granularity (layer)"):
        assert line in out, line


def test_cli_refuses_the_old_params_key(tmp_path: Path, capsys):
    import yaml

    path = tmp_path / "adaptive.yaml"
    path.write_text(yaml.safe_dump(_adaptive(params={"meta_steps": 3})))
    assert main(["merge", str(path), str(tmp_path / "out"), "--trust-code"]) == 1
    assert f"{path}: 'params' is now 'parameters'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
