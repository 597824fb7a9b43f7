"""Issue 11: bad input and faults. One test per way they used to hurt users, each built from small checkpoints."""

from __future__ import annotations

import errno
import importlib
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import save_file

import pyfuse
import pyfuse.io.writer as writer_module
from pyfuse.cli import main
from pyfuse.config import run_from_config
from pyfuse.finite import NonFiniteError
from pyfuse.io.sources import open_source
from pyfuse.merge import merge_to_dir, plan_merge
from pyfuse.stats import Statistics, collect_statistics

from .adaptive_helpers import DIGIT_TASKS, digits_models
from .merge_helpers import load_dir
from .stats_helpers import TokenMLP, mlp_batches, mlp_logits, perturbed

write_module = importlib.import_module("pyfuse.engine.write")  # where the engine hashes its inputs

RUN = {"progress": False, "backend": "reference", "checkpoint_every": 0}


def _models(root, n=2, dtype=torch.float32, seed=0):
    """A base and n fine-tuned single-file checkpoints of two tensors; returns their paths and state dicts."""
    g = torch.Generator().manual_seed(seed)
    base = {"a.weight": torch.randn(3, 4, generator=g), "b.bias": torch.randn(5, generator=g)}
    save_file(base, root / "base.safetensors")
    paths, states = [], []
    for i in range(n):
        state = {k: (v + 0.1 * torch.randn(v.shape, generator=g)).to(dtype) for k, v in base.items()}
        save_file(state, root / f"ft{i}.safetensors")
        paths.append(root / f"ft{i}.safetensors")
        states.append(state)
    return root / "base.safetensors", paths, base, states


def _config(root, name="merge.yaml", **entries):
    config = {"method": "task_arithmetic", "base": "base.safetensors", "models": ["ft0.safetensors",
                                                                                  "ft1.safetensors"]}
    config.update(entries)
    (root / name).write_text(yaml.safe_dump(config))
    return root / name


def _partials(parent):
    return sorted(p.name for p in parent.iterdir() if ".partial-" in p.name or ".replaced-" in p.name)


def _digits_config(root, method="adamerging", params=None, tasks_module="tests.adaptive_helpers"):
    base, finetuned = digits_models()
    save_file(base, root / "base.safetensors")
    for name, state in zip(DIGIT_TASKS, finetuned):
        save_file(state, root / f"{name}.safetensors")
    return {
        "method": method,
        "base": str(root / "base.safetensors"),
        "models": {name: str(root / f"{name}.safetensors") for name in DIGIT_TASKS},
        "architecture": f"{tasks_module}:digits_architecture",
        "tasks": {name: {"factory": f"{tasks_module}:digits_task", "kwargs": {"name": name}} for name in DIGIT_TASKS},
        "parameters": params if params is not None else {"granularity": "task", "steps": 1},
        "run": RUN,
    }


# ---------------------------------------------------------------------------------------------
# Data loss
# ---------------------------------------------------------------------------------------------
def test_1_adaptive_merges_follow_the_output_rules(tmp_path):
    config = _digits_config(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="already exists"):
        run_from_config(config, out, trust_code=True)
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt"]
    # an input's directory is never an output, --force or not
    with pytest.raises(ValueError, match="holds the input"):
        run_from_config(config, tmp_path, trust_code=True, force=True)

    run = tmp_path / "run"
    run_from_config(config, run, trust_code=True)
    checkpoint = (run / "checkpoint.pt").read_bytes()
    # a rerun without --resume would overwrite the previous run's checkpoint: refused without --force
    with pytest.raises(FileExistsError, match="already exists"):
        run_from_config({**config, "parameters": {"granularity": "task", "steps": 2}}, run,
                                        trust_code=True)
    assert (run / "checkpoint.pt").read_bytes() == checkpoint
    resumed = run_from_config(config, run, trust_code=True, resume=True)
    assert resumed.report["resumed_from"] == 1
    forced = run_from_config({**config, "parameters": {"granularity": "task", "steps": 2}}, run,
                                             trust_code=True, force=True)
    assert forced.report["steps"] == 2


def test_2_force_never_deletes_files_the_merge_reads(tmp_path, capsys):
    _models(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    logits = {"a.weight": torch.zeros(3, 4), "b.bias": torch.zeros(5)}
    save_file(logits, out / "logits.safetensors")
    concrete = _config(tmp_path, "concrete.yaml", method="concrete",
                       parameters={"logits": "out/logits.safetensors", "mask": "hard"})
    assert main(["merge", str(concrete), str(out), "--force", "--no-progress"]) == 1
    assert "holds the input" in capsys.readouterr().err and (out / "logits.safetensors").exists()

    # statistics files, and the config itself, are protected the same way
    stats = Statistics({"gram_in/a.weight": torch.eye(4)}, task="t", examples=1, tokens=1)
    for i in range(2):
        stats.save(out / f"stats{i}.safetensors")
    regmean = _config(tmp_path, "regmean.yaml", method="regmean",
                      models=[{"path": f"ft{i}.safetensors", "statistics": f"out/stats{i}.safetensors"}
                              for i in range(2)])
    assert main(["merge", str(regmean), str(out), "--force", "--dry-run"]) == 1
    assert "stats0.safetensors" in capsys.readouterr().err
    config = _config(out, "merge.yaml", base="../base.safetensors",
                     models=["../ft0.safetensors", "../ft1.safetensors"])
    assert main(["merge", str(config), str(out), "--force", "--no-progress"]) == 1
    assert "merge.yaml" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["logits.safetensors", "merge.yaml", "stats0.safetensors",
                                                     "stats1.safetensors"]


def test_3_commit_never_replaces_a_directory_that_appeared_meanwhile(tmp_path, monkeypatch):
    base, finetuned, _, _ = _models(tmp_path)
    out = tmp_path / "out"
    write_tensor = writer_module.ShardedWriter.write_tensor

    def someone_else_creates_out(self, name, chunks):
        out.mkdir(exist_ok=True)
        (out / "theirs.txt").write_text("not yours")
        return write_tensor(self, name, chunks)

    monkeypatch.setattr(writer_module.ShardedWriter, "write_tensor", someone_else_creates_out)
    with pytest.raises(FileExistsError, match="appeared while this run was writing"):
        merge_to_dir("average", base, finetuned, out)
    assert (out / "theirs.txt").read_text() == "not yours" and not _partials(tmp_path)

    # with --force, only the directory that was there when checked may be replaced, not one swapped in since
    def swapped_meanwhile(self, name, chunks):
        if not (tmp_path / "checked").exists():
            out.rename(tmp_path / "checked")
            out.mkdir()
            (out / "swapped-in.txt").write_text("not yours either")
        return write_tensor(self, name, chunks)

    monkeypatch.setattr(writer_module.ShardedWriter, "write_tensor", swapped_meanwhile)
    with pytest.raises(FileExistsError, match="appeared while this run was writing"):
        merge_to_dir("average", base, finetuned, out, force=True)
    assert (out / "swapped-in.txt").exists() and not _partials(tmp_path)
    monkeypatch.setattr(writer_module.ShardedWriter, "write_tensor", write_tensor)
    merge_to_dir("average", base, finetuned, out, force=True)  # the directory checked is replaced
    assert sorted(p.name for p in out.iterdir())[0] == "merge_report.json"


def test_4_a_full_disk_and_killed_runs_leave_no_partial_directories(tmp_path, monkeypatch, capsys):
    base, finetuned, _, _ = _models(tmp_path)

    class FullDisk:
        """A file on a full disk: writing fails, and so does closing (which flushes)."""

        def __init__(self, *args):
            pass

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def close(self):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer_module, "open", FullDisk, raising=False)
    with pytest.raises(OSError, match="No space left"):
        merge_to_dir("average", base, finetuned, tmp_path / "out")
    assert not _partials(tmp_path) and not (tmp_path / "out").exists()
    monkeypatch.undo()

    # a killed run's partial directory (its process is gone) is removed by the next run of the same output
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".out.partial-{dead.pid}-0123abcd"
    stale.mkdir()
    (stale / "model-00001-of-00001.safetensors").write_bytes(b"half")
    running = tmp_path / f".out.partial-{os.getpid()}-89abcdef"  # a live process: not stale
    running.mkdir()
    other = tmp_path / f".other.partial-{dead.pid}-0123abcd"  # another output's: not ours to judge
    other.mkdir()
    config = _config(tmp_path)
    assert main(["merge", str(config), str(tmp_path / "out"), "--no-progress"]) == 0
    assert f"removed {stale}" in capsys.readouterr().out
    assert not stale.exists() and running.exists() and other.exists()
    report = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    assert report["removed_stale_partials"] == [str(stale)]


# ---------------------------------------------------------------------------------------------
# Silent corruption
# ---------------------------------------------------------------------------------------------
def test_5_nonfinite_values_never_reach_an_output_silently(tmp_path, capsys):
    base, finetuned, base_state, states = _models(tmp_path)
    poisoned = dict(states[1])
    poisoned["a.weight"] = poisoned["a.weight"].clone()
    poisoned["a.weight"][0, :2] = torch.tensor([float("nan"), float("inf")])
    save_file(poisoned, tmp_path / "ft1.safetensors")
    with pytest.raises(NonFiniteError, match=r"fine-tuned model 2 .*ft1.safetensors.*'a.weight': 2 of 12 values"):
        merge_to_dir("ties", base, finetuned, tmp_path / "out", density=0.5)
    assert not (tmp_path / "out").exists() and not _partials(tmp_path)
    assert main(["merge", str(_config(tmp_path)), str(tmp_path / "out"), "--no-progress"]) == 1
    assert "2 of 12 values are NaN or inf" in capsys.readouterr().err
    # an explicit option lets them through
    assert main(["merge", str(_config(tmp_path)), str(tmp_path / "out"), "--no-progress", "--allow-nonfinite"]) == 0
    assert int((~torch.isfinite(load_dir(tmp_path / "out")["a.weight"])).sum()) == 2
    save_file(states[1], tmp_path / "ft1.safetensors")

    # overflow when casting to float16: 1e5 > float16's 65504
    huge = {k: v * 1e5 for k, v in states[0].items()}
    save_file(huge, tmp_path / "huge.safetensors")
    overflow = int((huge["a.weight"].abs() > torch.finfo(torch.float16).max).sum())
    assert overflow > 0
    with pytest.raises(NonFiniteError, match=rf"average: merged tensor 'a.weight': {overflow} of 12 values"):
        merge_to_dir("average", base, [tmp_path / "huge.safetensors"], tmp_path / "fp16", dtype="float16")
    assert not (tmp_path / "fp16").exists()

    # NaN statistics
    nan_fisher = [Statistics({"fisher/a.weight": torch.full((3, 4), float("nan")), "fisher/b.bias": torch.ones(5)},
                             task=f"t{i}", examples=1, tokens=1) for i in range(2)]
    with pytest.raises(NonFiniteError, match="fisher: merged tensor 'a.weight': 12 of 12"):
        pyfuse.merge("fisher", base, finetuned, statistics=nan_fisher)

    # NaN weights given to the op
    tv = torch.randn(2, 6)
    with pytest.raises(NonFiniteError, match="weights: 1 of 2 values"):
        pyfuse.ops.concrete_merge(torch.zeros(6), tv, torch.zeros(6), torch.tensor([0.3, float("nan")]),
                                  torch.tensor([0, 6]), seed=0, backend="reference")

    # and the adaptive path: a NaN in a fine-tuned model stops before any task vector is used
    with pytest.raises(NonFiniteError, match="fine-tuned model 'b'.*'a.weight': 2 of 12"):
        pyfuse.TaskVectors.from_models(base, [finetuned[0], poisoned], names=["a", "b"])


def test_6_bf16_finetuned_models_of_an_fp32_base_merge_in_fp32_and_are_reported(tmp_path, capsys):
    base, finetuned, base_state, states = _models(tmp_path, dtype=torch.bfloat16)
    report = merge_to_dir("task_arithmetic", base, finetuned, tmp_path / "out", scaling=0.5)
    merged = load_dir(tmp_path / "out")
    for key, value in base_state.items():
        expected = value.double() + 0.5 * sum(s[key].double() - value.double() for s in states)
        assert merged[key].dtype == torch.float32
        torch.testing.assert_close(merged[key].double(), expected, rtol=0, atol=1e-6)
    assert len(report["dtype_upcasts"]) == 2
    assert "ft0.safetensors" in report["dtype_upcasts"][0] and "2 tensor(s) are bfloat16" in report["dtype_upcasts"][0]
    assert main(["merge", str(_config(tmp_path)), str(tmp_path / "dry"), "--dry-run"]) == 0
    assert "upcast" in capsys.readouterr().out
    tv = pyfuse.TaskVectors.from_models(base, finetuned)
    torch.testing.assert_close(tv.vectors[0][:12].double(),
                               (states[0]["a.weight"].double() - base_state["a.weight"].double()).flatten(),
                               rtol=0, atol=1e-6)


def test_7_statistics_are_checked_against_the_model_they_come_with(tmp_path):
    model = TokenMLP()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "base.safetensors")
    models, stats = [], []
    for i in range(2):
        tuned = perturbed(model, 0.1, seed=i)
        save_file(tuned, tmp_path / f"ft{i}.safetensors")
        model_i = TokenMLP()
        model_i.load_state_dict(tuned)
        stats.append(collect_statistics(model_i, mlp_batches(seed=i), mlp_logits, kinds=("gram_in",), name=f"t{i}",
                                        progress=False).save(tmp_path / f"stats{i}.safetensors"))
        models.append(tmp_path / f"ft{i}.safetensors")
    pyfuse.merge("regmean", tmp_path / "base.safetensors", models, statistics=stats)
    with pytest.raises(ValueError, match=r"statistics of task 't1', .*stats1.safetensors were not collected on "
                                         r"fine-tuned model 1"):
        pyfuse.merge("regmean", tmp_path / "base.safetensors", models, statistics=stats[::-1])


# ---------------------------------------------------------------------------------------------
# Late or unclear errors
# ---------------------------------------------------------------------------------------------
def test_8_truncated_safetensors_fail_the_dry_run_naming_the_file(tmp_path, capsys):
    _models(tmp_path)
    path = tmp_path / "ft1.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:-8])
    assert main(["merge", str(_config(tmp_path)), str(tmp_path / "out"), "--dry-run"]) == 1
    err = capsys.readouterr().err
    assert str(path) in err and "truncated" in err
    # offsets past the end of a file whose size agrees with its header size
    blob = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}).encode()
    odd = tmp_path / "offsets.safetensors"
    odd.write_bytes(len(blob).to_bytes(8, "little") + blob + bytes(8))
    with pytest.raises(ValueError, match=r"offsets.safetensors: tensor 'w': data ends at byte 16 of the data "
                                         r"section, but the file holds only 8"):
        open_source(odd)


def test_9_null_parameters_and_numbers_beyond_float32_are_refused_before_work(tmp_path, capsys):
    _models(tmp_path)
    config = _config(tmp_path, method="ties", parameters={"density": None})
    assert main(["merge", str(config), str(tmp_path / "out"), "--dry-run"]) == 1
    assert "ties: parameter 'density' is null" in capsys.readouterr().err
    config = _config(tmp_path, parameters={"scaling": 1e300})
    assert main(["merge", str(config), str(tmp_path / "out"), "--dry-run"]) == 1
    assert "scaling must be within float32's range" in capsys.readouterr().err


def test_10_malformed_files_name_the_file_and_the_problem(tmp_path, capsys):
    _models(tmp_path)
    bad = tmp_path / "list.safetensors"
    blob = b"[1, 2]  "
    bad.write_bytes(len(blob).to_bytes(8, "little") + blob)
    with pytest.raises(ValueError, match=r"list.safetensors: malformed safetensors header \(a JSON list"):
        open_source(bad)
    blob = json.dumps({"w": {"dtype": "F32", "data_offsets": [0, 4]}}).encode()
    bad.write_bytes(len(blob).to_bytes(8, "little") + blob + bytes(4))
    with pytest.raises(ValueError, match=r"list.safetensors: tensor 'w': malformed header entry"):
        open_source(bad)
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(ValueError, match=r"model.safetensors.index.json: 'weight_map' must map"):
        open_source(sharded)

    binary = tmp_path / "binary.yaml"
    binary.write_bytes(bytes(range(128, 256)))
    assert main(["merge", str(binary), str(tmp_path / "out")]) == 1
    assert f"{binary}: not a text (UTF-8) file" in capsys.readouterr().err
    config = _config(tmp_path, method=["ties"])
    assert main(["merge", str(config), str(tmp_path / "out")]) == 1
    assert f"{config}: 'method' must be a method name" in capsys.readouterr().err


def test_11_the_output_location_is_checked_first_in_both_modes(tmp_path, capsys, monkeypatch):
    _models(tmp_path)
    (tmp_path / "a-file").write_text("")
    hashed = []
    monkeypatch.setattr(write_module, "sha256_file", lambda path: hashed.append(path) or "0")
    for mode in ([], ["--dry-run"]):
        assert main(["merge", str(_config(tmp_path)), str(tmp_path / "a-file" / "out"), *mode]) == 1
        assert "a-file is not a directory" in capsys.readouterr().err
        # --force onto an input: the dry run says no, as the run would
        assert main(["merge", str(_config(tmp_path)), str(tmp_path), "--force", *mode]) == 1
        assert "holds the input" in capsys.readouterr().err
    assert hashed == []


# ---------------------------------------------------------------------------------------------
# Trust boundaries
# ---------------------------------------------------------------------------------------------
def test_12_adaptive_configs_run_code_only_with_trust_code(tmp_path, capsys, monkeypatch):
    marker = tmp_path / "code-ran"
    (tmp_path / "downloaded_tasks.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
        "from tests.adaptive_helpers import digits_architecture, digits_task  # noqa: F401\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    config = tmp_path / "adaptive.yaml"
    config.write_text(yaml.safe_dump(_digits_config(tmp_path, tasks_module="downloaded_tasks")))
    assert main(["merge", str(config), str(tmp_path / "out")]) == 1
    assert "--trust-code" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "out").exists()
    with pytest.raises(PermissionError, match="trust_code=True"):
        run_from_config(yaml.safe_load(config.read_text()), tmp_path / "out")
    assert main(["merge", str(config), str(tmp_path / "out"), "--trust-code"]) == 0
    assert marker.exists() and (tmp_path / "out" / "report.json").exists()
    with pytest.raises(SystemExit):
        main(["merge", "--help"])
    assert "--trust-code" in capsys.readouterr().out


def test_13_an_index_may_not_point_outside_the_model_directory(tmp_path):
    base, finetuned, _, states = _models(tmp_path)
    (tmp_path / "other").mkdir()
    save_file(states[1], tmp_path / "other" / "model.safetensors")
    model = tmp_path / "model"
    model.mkdir()
    index = {"metadata": {}, "weight_map": {key: "../other/model.safetensors" for key in states[1]}}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"index.json: tensor '.*' points to '../other/model.safetensors', outside"):
        plan_merge("average", base, [model])
    # shards inside the directory are fine
    save_file(states[1], model / "model-00001-of-00001.safetensors")
    index["weight_map"] = {key: "model-00001-of-00001.safetensors" for key in states[1]}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    merged = pyfuse.merge("average", base, [model])
    torch.testing.assert_close(merged["a.weight"], states[1]["a.weight"])


def test_adaptive_settings_are_checked_before_any_model_loads(tmp_path, monkeypatch):
    def loading(*args, **kwargs):
        raise AssertionError("the models were loaded before the settings were checked")

    monkeypatch.setattr("pyfuse.taskvectors.TaskVectors.from_models", loading)
    monkeypatch.setattr("tests.adaptive_helpers.digits_architecture", loading)
    for method, params, message in [
        ("concrete_adamerging", {"temperature": 0}, "temperature must be > 0"),
        ("adamerging", {"stepz": 3}, "unknown parameter 'stepz'"),
        ("adamerging", {"granularity": "tensor"}, "granularity must be 'task'"),
    ]:
        with pytest.raises(ValueError, match=message):
            run_from_config(_digits_config(tmp_path, method, params), tmp_path / "out", trust_code=True)
