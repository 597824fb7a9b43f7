"""`pyfuse merge CONFIG OUT_DIR`: config files, dry runs, summaries and errors."""

import json

import pytest
import torch
import yaml

import pyfuse
from pyfuse.cli import main
from pyfuse.io.sources import TensorSource

from .merge_helpers import load_dir, save_family, tiny_llama


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return save_family(tiny_llama, tmp_path_factory.mktemp("llama"))


def _config(path, llama, **extra):
    base_dir, dirs, _, _ = llama
    config = {"method": "ties", "base": str(base_dir), "models": [str(d) for d in dirs], **extra}
    path.write_text(yaml.safe_dump(config))
    return path


def test_help_has_examples(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and "pyfuse merge merge.yaml ./merged --dry-run" in out
    with pytest.raises(SystemExit):
        main(["merge", "--help"])
    out = capsys.readouterr().out
    assert "config (YAML):" in out and "--dry-run" in out and "--force" in out
    assert "density (0.2)" in out and "trim (global)" in out  # every method's parameters, with defaults
    assert main([]) == 2


def test_merge_writes_the_model_and_a_summary(llama, tmp_path, capsys):
    base_dir, dirs, base, states = llama
    config = _config(tmp_path / "ties.yaml", llama, parameters={"density": 0.5}, dtype="bfloat16",
                     shard_size="20KB")
    assert main(["merge", str(config), str(tmp_path / "out"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("merged 21 tensors") and "peak memory" in out and "merge_report.json" in out
    merged = load_dir(tmp_path / "out")
    expected = pyfuse.merge("ties", base, states, density=0.5, dtype="bfloat16")
    assert all(torch.equal(merged[k], v) for k, v in expected.items())
    report = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    assert report["parameters"]["density"] == 0.5 and len(report["output"]["shards"]) > 1


def test_relative_paths_and_per_model_weights(llama, tmp_path):
    base_dir, dirs, base, states = llama
    (tmp_path / "models").mkdir()
    for path in (base_dir, *dirs):
        (tmp_path / "models" / path.name).symlink_to(path)
    config = tmp_path / "conf" / "ta.yaml"
    config.parent.mkdir()
    config.write_text(yaml.safe_dump({
        "method": "task_arithmetic", "base": "../models/base",
        "models": [{"path": "../models/finetuned0", "weight": 2.0}, "../models/finetuned1"],
        "parameters": {"scaling": 0.5},
    }))
    assert main(["merge", str(config), str(tmp_path / "out"), "--no-progress", "--no-hash"]) == 0
    expected = pyfuse.merge("task_arithmetic", base, states, scaling=0.5, weights=[2.0, 1.0])
    merged = load_dir(tmp_path / "out")
    assert all(torch.equal(merged[k], v) for k, v in expected.items())
    report = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    assert "sha256" not in report["inputs"][0]["files"][0]


def test_dry_run_reads_no_tensor_data(llama, tmp_path, capsys, monkeypatch):
    config = _config(tmp_path / "ties.yaml", llama)

    def no_reading(self, key):
        raise AssertionError(f"dry run read {key}")

    monkeypatch.setattr(TensorSource, "get", no_reading)
    assert main(["merge", str(config), str(tmp_path / "out"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "no tensor data was read" in out and "peak memory" in out and "(predicted)" in out
    assert "output" in out and "KiB in 1 shard" in out and "3 over the whole model" in out
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("config,message", [
    ({"method": "ties", "models": ["a"]}, "missing 'base'"),
    ({"method": "ties", "base": "b", "models": []}, "'models' must be a non-empty list"),
    ({"method": "ties", "base": "b", "models": ["a"], "densty": 1}, "unknown key 'densty'"),
    ({"method": "ties", "base": "b", "models": [{"path": "a", "wieght": 2}]}, "models[0] needs 'path'"),
    ({"method": "tie", "base": "b", "models": ["a"]}, "unknown merge method 'tie'"),
    ({"method": "ties", "base": "b", "models": [{"path": "a", "weight": 2}], "parameters": {"weights": [1]}},
     "either per model or in parameters.weights"),
])
def test_config_errors_name_the_file(tmp_path, capsys, config, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["merge", str(path), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"pyfuse merge: error: {path}") and message in err


def test_runtime_errors_exit_1(llama, tmp_path, capsys):
    config = _config(tmp_path / "ties.yaml", llama, parameters={"density": 0})
    assert main(["merge", str(config), str(tmp_path / "out")]) == 1
    assert "ties: density must be in (0, 1], got 0" in capsys.readouterr().err
    config = _config(tmp_path / "ties.yaml", llama)
    (tmp_path / "out").mkdir()
    assert main(["merge", str(config), str(tmp_path / "out"), "--dry-run"]) == 1
    assert "already exists; choose another output or pass --force" in capsys.readouterr().err
    assert main(["merge", str(config), str(tmp_path / "out"), "--dry-run", "--force"]) == 0
    assert "will be replaced" in capsys.readouterr().out
    assert main(["merge", str(tmp_path / "none.yaml"), str(tmp_path / "x")]) == 1
    assert "no such config file" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["merge", str(config), str(tmp_path / "y"), "--device", "cuda"]) == 1
        assert "torch reports no CUDA device" in capsys.readouterr().err


def test_data_aware_merge_from_config_with_statistics(tmp_path, capsys):
    from safetensors.torch import save_file

    from pyfuse.stats import collect_statistics

    from .stats_helpers import TokenMLP, mlp_batches, mlp_logits, perturbed

    model = TokenMLP()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "base.safetensors"))
    entries = []
    for i in range(2):
        tuned = perturbed(model, 0.1, seed=i)
        save_file(tuned, str(tmp_path / f"ft{i}.safetensors"))
        model_i = TokenMLP()
        model_i.load_state_dict(tuned)
        collect_statistics(model_i, mlp_batches(seed=i), mlp_logits, kinds=("gram_in",),
                           progress=False).save(tmp_path / f"stats{i}.safetensors")
        entries.append({"path": f"ft{i}.safetensors", "statistics": f"stats{i}.safetensors"})
    (tmp_path / "regmean.yaml").write_text(yaml.safe_dump({"method": "regmean", "base": "base.safetensors",
                                                            "models": entries}))
    assert main(["merge", str(tmp_path / "regmean.yaml"), str(tmp_path / "out"), "--no-progress"]) == 0
    expected = pyfuse.merge("regmean", tmp_path / "base.safetensors",
                            [tmp_path / "ft0.safetensors", tmp_path / "ft1.safetensors"],
                            statistics=[tmp_path / "stats0.safetensors", tmp_path / "stats1.safetensors"])
    merged = load_dir(tmp_path / "out")
    assert all(torch.equal(merged[k], expected[k]) for k in expected)
    report = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    assert len(report["statistics"]) == 2

    entries[1].pop("statistics")
    (tmp_path / "partial.yaml").write_text(yaml.safe_dump({"method": "regmean", "base": "base.safetensors",
                                                            "models": entries}))
    assert main(["merge", str(tmp_path / "partial.yaml"), str(tmp_path / "out2")]) == 1
    assert "models[1] has no 'statistics'" in capsys.readouterr().err


@pytest.mark.parametrize("config,options", [
    ({"method": "ties"}, []),
    ({"method": "ties"}, ["--dry-run"]),
    ({"method": "regmean", "models": [{"path": "missing-model", "statistics": "missing.safetensors"}]}, []),
    ({"method": "regmean++", "models": {"a": "missing-model"}, "tasks": {"a": "no_such_module:task"}},
     ["--trust-code"]),
    ({"method": "concrete_adamerging", "models": {"a": "missing-model"}, "tasks": {"a": "no_such_module:task"}},
     ["--trust-code"]),
])
def test_the_output_location_is_checked_before_any_input_is_opened(tmp_path, capsys, config, options):
    """Inputs that cannot be opened and an OUT_DIR that cannot be created: the error is about the output."""
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump({"base": "missing-base", "models": ["missing-model"], **config}))
    (tmp_path / "a-file").write_text("")
    assert main(["merge", str(path), str(tmp_path / "a-file" / "out"), "--no-progress", *options]) == 1
    err = capsys.readouterr().err
    assert f"cannot create {tmp_path / 'a-file' / 'out'}: {tmp_path / 'a-file'} is not a directory" in err, err


def test_merge_to_dir_checks_the_output_location_before_opening_an_input(tmp_path):
    (tmp_path / "a-file").write_text("")
    with pytest.raises(NotADirectoryError, match="is not a directory"):
        pyfuse.merge_to_dir("ties", tmp_path / "missing-base", [tmp_path / "missing-model"],
                            tmp_path / "a-file" / "out")


@pytest.mark.parametrize("command", ["demo", "finetune", "merge", "plot"])
def test_help_is_the_same_on_every_machine(command, capsys, monkeypatch, tmp_path):
    """docs/cli.md renders the help: no home directory, cache path or detected value may enter it."""
    import pyfuse.finetune

    texts = []
    for home, bf16 in ((tmp_path / "one", True), (tmp_path / "two", False)):
        monkeypatch.setenv("HOME", str(home))
        monkeypatch.setenv("PYFUSE_CACHE", str(home / "cache"))
        monkeypatch.setattr(pyfuse.finetune, "native_bf16", lambda device="cpu", bf16=bf16: bf16)
        with pytest.raises(SystemExit):
            main([command, "--help"])
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1]
    assert str(tmp_path) not in texts[0] and "here:" not in texts[0]


def test_demo_help_lists_come_from_the_rows_and_the_registry(capsys):
    from pyfuse.demo import ALL_METHODS, METHODS, STOCHASTIC

    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    out = " ".join(capsys.readouterr().out.split("options:")[1].split())  # the options, not the usage line
    seeds = out[out.index("--seeds SEEDS"):out.index("--test-limit")]
    methods = out[out.index("--methods METHODS"):out.index("--seeds SEEDS")]
    assert "della" in STOCHASTIC and all(name in seeds for name in STOCHASTIC)
    opt_in = [name for name in ALL_METHODS if name not in METHODS]
    assert "regmean++" in opt_in and "della" in METHODS
    assert methods.index("run only when named: " + ", ".join(opt_in)) > methods.index(", ".join(METHODS))
    with pytest.raises(SystemExit):
        main(["demo", "--backend", "cuda"])
    assert "invalid choice: 'cuda'" in capsys.readouterr().err
