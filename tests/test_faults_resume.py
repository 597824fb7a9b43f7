"""Issue 28: resume, concurrent runs, inputs that change, checkpoint integrity. One test per row of its fault
table, each on small checkpoints: concurrency by two real processes, corruption by flipped bytes, kills by
real signals at the write points."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

import pyfuse
from pyfuse.adaptive import AdaptiveLoop, RunOptions
from pyfuse.adaptive.checkpoint import CheckpointError, load_checkpoint
from pyfuse.architecture import check_architecture
from pyfuse.cli import main
from pyfuse.config import ConfigError, load_config, run_from_config
from pyfuse.io.identity import InputChanged
from pyfuse.io.lock import lock_path, output_lock
from pyfuse.merge import merge_to_dir

from .adaptive_helpers import DIGIT_TASKS, digits_models, digits_problem, digits_task, mlp
from .merge_helpers import save_family, tiny_llama
from .test_faults import _config, _digits_config, _models

ROOT = Path(__file__).resolve().parents[1]
STEPS = {"granularity": "task", "steps": 2}


def _yaml(root: Path, config: dict, name: str = "adaptive.yaml") -> Path:
    (root / name).write_text(yaml.safe_dump(config))
    return root / name


def _leftovers(directory: Path) -> list[str]:
    """Temporaries and partial or replaced directories a run may leave, in `directory` and beside it."""
    names = [p.name for p in directory.parent.iterdir() if p.name.startswith(f".{directory.name}.")]
    if directory.is_dir():
        names += [p.name for p in directory.iterdir() if p.name.startswith(".")]
    return names


def _in_process(args: list[str], script: str = "") -> subprocess.CompletedProcess:
    """`pyfuse merge ARGS` in a fresh Python process, after running `script` there (a fault to inject)."""
    code = f"import sys\n{script}\nfrom pyfuse.cli import main\nsys.exit(main({args!r}))\n"
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)


def slow_digits_task(name: str):
    """A digits task whose every forward takes a while: a run that is still going when a second one starts."""
    task = digits_task(name)
    logits = task.logits

    def slow(call, inputs):
        time.sleep(0.05)
        return logits(call, inputs)

    task.logits = slow
    return task


def shifted_digits_task(name: str):
    """A digits task of the same name whose batches differ: other data under an unchanged name."""
    return digits_task(name, batch_size=8)


def wide_architecture(base) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.Tanh(), torch.nn.Linear(48, 10))


def deep_architecture(base) -> torch.nn.Module:
    return torch.nn.Sequential(*mlp(), torch.nn.Tanh(), torch.nn.Linear(10, 10))


# ---------------------------------------------------------------------------------------------
# Row 1: --resume after the inputs changed
# ---------------------------------------------------------------------------------------------
def test_resume_refuses_other_models_base_or_data_naming_the_difference(tmp_path):
    config = _digits_config(tmp_path, params=STEPS)
    out = tmp_path / "run"
    first = run_from_config(config, out, trust_code=True)
    identity = first.report["identity"]
    for role, name in [("base", "base"), *((task, task) for task in DIGIT_TASKS)]:
        digest = hashlib.sha256((tmp_path / f"{name}.safetensors").read_bytes()).hexdigest()
        assert [entry["sha256"] for entry in identity["inputs"][role]] == [digest]
    assert set(identity["data"]) == set(DIGIT_TASKS) and identity["world_size"] == 1
    assert json.loads((out / "report.json").read_text())["identity"] == identity
    assert run_from_config(config, out, trust_code=True, resume=True).report["resumed_from"] == 2

    swapped = {**config, "models": {"low": config["models"]["high"], "high": config["models"]["low"],
                                    "even": config["models"]["even"]}}
    with pytest.raises(ValueError, match=r"different run; differing: inputs\.high .*inputs\.low"):
        run_from_config(swapped, out, trust_code=True, resume=True)

    _, finetuned = digits_models()
    save_file(finetuned[2], tmp_path / "other.safetensors")  # model 'high' changed: ft_b -> ft_c
    with pytest.raises(ValueError, match=r"differing: inputs\.high \("):
        run_from_config({**config, "models": {**config["models"], "high": str(tmp_path / "other.safetensors")}},
                        out, trust_code=True, resume=True)

    base, _ = digits_models()
    save_file({k: v + 0.01 for k, v in base.items()}, tmp_path / "base2.safetensors")
    with pytest.raises(ValueError, match=r"differing: inputs\.base \("):
        run_from_config({**config, "base": str(tmp_path / "base2.safetensors")}, out, trust_code=True, resume=True)

    changed = {**config, "tasks": {**config["tasks"], "low": {"factory": f"{__name__}:shifted_digits_task",
                                                             "kwargs": {"name": "low"}}}}
    with pytest.raises(ValueError, match="differing: the data of task 'low'"):
        run_from_config(changed, out, trust_code=True, resume=True)
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 2  # every refusal left the checkpoint as it was


def test_resume_from_python_refuses_other_task_vectors(tmp_path):
    """Without files to hash (models given in memory), the task vectors' content is the identity."""
    model, tv, tasks = digits_problem()
    options = RunOptions(out_dir=tmp_path, progress=False, backend="reference", checkpoint_every=1)
    pyfuse.adamerging(model, tv, tasks, granularity="task", steps=1, options=options)
    swapped = pyfuse.TaskVectors.from_models(*_swapped(digits_models()), names=list(DIGIT_TASKS))
    options.resume = True
    with pytest.raises(ValueError, match="differing: task_vectors"):
        pyfuse.adamerging(model, swapped, tasks, granularity="task", steps=1, options=options)
    assert pyfuse.adamerging(model, tv, tasks, granularity="task", steps=1,
                             options=options).report["resumed_from"] == 1


def _swapped(models):
    base, (low, high, even) = models
    return base, [high, low, even]


def test_an_input_changed_during_an_adaptive_run_is_refused_at_commit(tmp_path, monkeypatch):
    config = _digits_config(tmp_path, params=STEPS)
    out = tmp_path / "run"
    adapt_step = AdaptiveLoop.adapt_step
    _, finetuned = digits_models()

    def overwriting(self):
        if self.step == 1:  # ft_b -> ft_c, after the task vectors were read
            save_file(finetuned[2], tmp_path / "high.safetensors")
        return adapt_step(self)

    monkeypatch.setattr(AdaptiveLoop, "adapt_step", overwriting)
    with pytest.raises(InputChanged, match="high.safetensors: input changed while this run read it"):
        run_from_config(config, out, trust_code=True)
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# Row 2: a checkpoint of other models, or with a flipped bit
# ---------------------------------------------------------------------------------------------
def test_a_foreign_or_corrupted_checkpoint_is_refused_naming_the_file(tmp_path, capsys):
    config = _digits_config(tmp_path, method="concrete_adamerging",
                            params={"granularity": "task", "meta_steps": 1, "inner_steps": 1, "adamerging_steps": 0})
    out = tmp_path / "run"
    run_from_config(config, out, trust_code=True)
    checkpoint = out / "checkpoint.pt"
    intact = checkpoint.read_bytes()

    other = tmp_path / "other"  # a run over other models: its checkpoint copied in is refused by its inputs
    other.mkdir()
    run_from_config(_digits_config(other, method="concrete_adamerging", params=config["parameters"]) | {
        "models": {**config["models"], "low": config["models"]["even"]}}, other / "run", trust_code=True)
    checkpoint.write_bytes((other / "run" / "checkpoint.pt").read_bytes())
    with pytest.raises(ValueError, match=r"differing: inputs\.low"):
        run_from_config(config, out, trust_code=True, resume=True)

    header = intact.index(b"\n") + 1
    for offset in (header + 200, len(intact) // 2, len(intact) - 30):  # in the pickled state and in the tensors
        flipped = bytearray(intact)
        flipped[offset] ^= 0x04
        checkpoint.write_bytes(bytes(flipped))
        with pytest.raises(CheckpointError, match=f"{checkpoint}: corrupted"):
            run_from_config(config, out, trust_code=True, resume=True)

    cfg = _yaml(tmp_path, config)
    for content, message in [(b"", "empty file"), (b"\x00garbage" * 10, "not a pyfuse adaptive-merging checkpoint"),
                             (intact[header:], "an earlier pyfuse's, without a checksum")]:
        checkpoint.write_bytes(content)
        assert main(["merge", str(cfg), str(out), "--trust-code", "--resume"]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err and str(checkpoint) in err, err
        assert "weights_only" not in err and "Traceback" not in err
    checkpoint.write_bytes(intact)
    assert run_from_config(config, out, trust_code=True, resume=True).report["resumed_from"] == 1


# ---------------------------------------------------------------------------------------------
# Row 3: two runs on one OUT_DIR at once
# ---------------------------------------------------------------------------------------------
def test_a_second_run_on_a_busy_out_dir_refuses_naming_the_holder(tmp_path, capsys):
    config = _digits_config(tmp_path, params={"granularity": "task", "steps": 40})
    config["tasks"] = {name: {"factory": f"{__name__}:slow_digits_task", "kwargs": {"name": name}}
                       for name in DIGIT_TASKS}
    config["run"] = {**config["run"], "checkpoint_every": 1}
    out = tmp_path / "out"
    first = subprocess.Popen([sys.executable, "-m", "pyfuse", "merge", str(_yaml(tmp_path, config)), str(out),
                              "--trust-code", "--no-progress"], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (lock_path(out).exists() and lock_path(out).read_text().strip() == str(first.pid)):
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.05)
        # other settings into the same OUT_DIR, and a static merge with --force into it: both refused at once
        second = _yaml(tmp_path, {**config, "parameters": {**config["parameters"], "init": 0.2}}, "second.yaml")
        assert main(["merge", str(second), str(out), "--trust-code", "--resume", "--no-progress"]) == 1
        err = capsys.readouterr().err
        assert f"being written by another run (pid {first.pid}" in err and err.count("\n") == 1
        static = tmp_path / "static"
        static.mkdir()
        base, finetuned, _, _ = _models(static)
        assert main(["merge", str(_config(static)), str(out), "--force", "--no-progress"]) == 1
        assert f"pid {first.pid}" in capsys.readouterr().err
        with pytest.raises(RuntimeError, match=f"pid {first.pid}"):
            merge_to_dir("average", base, finetuned, out, force=True)
        assert first.wait(timeout=300) == 0, first.communicate()
    finally:
        first.kill()
        first.wait()
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "merged", "report.json"]
    assert json.loads((out / "report.json").read_text())["settings"]["init"] == 0.3
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 40
    assert not lock_path(out).exists() and not _leftovers(out)


def test_the_lock_dies_with_its_holder(tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", "import sys; from pyfuse.io.lock import output_lock\n"
                               f"with output_lock({str(out)!r}):\n    print('held', flush=True); sys.stdin.read()"],
                              cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(RuntimeError, match=f"pid {holder.pid}"), output_lock(out):
        pass
    holder.kill()  # SIGKILL: no cleanup runs, the kernel drops the lock
    holder.wait()
    assert lock_path(out).exists()
    with output_lock(out):
        pass
    assert not lock_path(out).exists()


# ---------------------------------------------------------------------------------------------
# Row 4: an input overwritten during a static merge
# ---------------------------------------------------------------------------------------------
def test_an_input_changed_after_hashing_or_during_the_writes_fails_the_merge(tmp_path, monkeypatch):
    import pyfuse.io.writer as writer_module

    base, (ft0, ft1), _, states = _models(tmp_path)
    out = tmp_path / "out"
    write_module = sys.modules["pyfuse.engine.write"]  # where the engine hashes its inputs
    hash_file = write_module.sha256_file

    def overwritten_after_hashing(path):
        digest = hash_file(path)
        if Path(path) == ft1:
            save_file({k: v + 1 for k, v in states[0].items()} | {"extra": torch.zeros(1)}, ft1)  # ft_b -> ft_c
        return digest

    monkeypatch.setattr(write_module, "sha256_file", overwritten_after_hashing)
    with pytest.raises(InputChanged, match=f"{ft1}: input changed while this run read it"):
        merge_to_dir("average", base, [ft0, ft1], out, threads=1)
    assert not out.exists() and not _leftovers(out)
    monkeypatch.setattr(write_module, "sha256_file", hash_file)

    _, _, _, states = _models(tmp_path)
    write_tensor = writer_module.ShardedWriter.write_tensor

    def overwritten_during_the_writes(self, name, chunks):
        write_tensor(self, name, chunks)
        if name == "a.weight":  # in place, same size: only the modification time tells
            time.sleep(0.05)
            save_file({k: v * 2 for k, v in states[1].items()}, ft1)

    monkeypatch.setattr(writer_module.ShardedWriter, "write_tensor", overwritten_during_the_writes)
    with pytest.raises(InputChanged, match="modification time"):
        merge_to_dir("average", base, [ft0, ft1], out, threads=1)
    assert not out.exists() and not _leftovers(out)


def test_a_truncated_input_gives_one_line_not_sigbus(tmp_path):
    base, (ft0, ft1), _, _ = _models(tmp_path)
    size = ft1.stat().st_size
    truncate = (f"import os, pyfuse.io.writer as w\nwrite = w.ShardedWriter.write_tensor\n"
                f"def truncating(self, name, chunks):\n    write(self, name, chunks)\n"
                f"    os.truncate({str(ft1)!r}, {size - 16})\nw.ShardedWriter.write_tensor = truncating\n")
    cfg = _config(tmp_path)
    done = _in_process(["merge", str(cfg), str(tmp_path / "out"), "--no-progress", "--threads", "1"], truncate)
    assert done.returncode == 1, (done.returncode, done.stderr)  # -7 would be SIGBUS
    assert done.stderr.count("\n") == 1 and f"{ft1}: input changed" in done.stderr and "size" in done.stderr
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# Row 5: duplicate YAML keys; row 10: run options checked before any model loads
# ---------------------------------------------------------------------------------------------
def test_duplicate_keys_anywhere_are_refused_naming_key_and_line(tmp_path, capsys):
    _models(tmp_path)
    (tmp_path / "models.yaml").write_text("method: task_arithmetic\nbase: base.safetensors\n"
                                          "models: {x: ft0.safetensors, x: ft1.safetensors}\n")
    (tmp_path / "params.yaml").write_text("method: ties\nbase: base.safetensors\nmodels: [ft0.safetensors]\n"
                                          "parameters:\n  density: 0.5\nparameters:\n  scaling: 0.3\n")
    with pytest.raises(ConfigError, match=r"duplicate key 'x' on line 3 \(first given on line 3\)"):
        load_config(tmp_path / "models.yaml")
    assert main(["merge", str(tmp_path / "params.yaml"), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "duplicate key 'parameters' on line 6 (first given on line 4)" in err and err.count("\n") == 1
    # YAML merge keys override on purpose: not duplicates
    (tmp_path / "anchors.yaml").write_text("defaults: &d {density: 0.5}\n")
    base = "method: ties\nbase: base.safetensors\nmodels: [ft0.safetensors]\n"
    (tmp_path / "merged.yaml").write_text(base + "parameters: {<<: {density: 0.5}, density: 0.4}\n")
    assert load_config(tmp_path / "merged.yaml").parameters == {"density": 0.4}


@pytest.mark.parametrize("value", [-1, 0.5, "abc", True])
def test_run_options_are_checked_before_any_model_loads(tmp_path, value, monkeypatch):
    config = _digits_config(tmp_path)
    config["run"] = {**config["run"], "checkpoint_every": value}
    monkeypatch.setattr("pyfuse.runner.model_and_tasks", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(ConfigError, match=f"run: checkpoint_every must be an integer >= 0, got {value!r}"):
        run_from_config(config, tmp_path / "out", trust_code=True)
    config["run"] = {"eval_every": 0}
    with pytest.raises(ConfigError, match="run: eval_every must be an integer >= 1"):
        run_from_config(config, tmp_path / "out", trust_code=True)
    config["run"] = {"backend": "cuda-magic"}
    with pytest.raises(ConfigError, match="run: backend must be one of"):
        run_from_config(config, tmp_path / "out", trust_code=True)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# Row 6: an architecture that is not the checkpoints'
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("architecture, message", [
    ("wide_architecture", r"tensor '0.weight' has shape \[48, 64\], \[32, 64\] in"),
    ("deep_architecture", r"has a tensor '4.weight' that .* lacks"),
])
def test_an_architecture_of_another_size_is_refused_before_any_step(tmp_path, architecture, message, monkeypatch):
    config = _digits_config(tmp_path) | {"architecture": f"{__name__}:{architecture}"}
    monkeypatch.setattr("pyfuse.adaptive.loop.AdaptiveLoop.run", lambda self: pytest.fail("a step ran"))
    with pytest.raises(ValueError, match=message):
        run_from_config(config, tmp_path / "out", trust_code=True)
    assert not (tmp_path / "out").exists()


def test_architecture_check_compares_config_and_names_a_causal_lm_without_architecture(tmp_path):
    import transformers

    base_dir, _, _, _ = save_family(tiny_llama, tmp_path, n=1)
    check_architecture(tiny_llama(), base_dir, "model")  # the checkpoints' own architecture passes
    config = transformers.LlamaConfig.from_pretrained(base_dir)
    config.max_position_embeddings = 64  # no tensor changes shape, the saved config would lie
    with pytest.raises(ValueError, match="config max_position_embeddings is 64, 32 in"):
        check_architecture(transformers.LlamaForCausalLM(config), base_dir, "model")
    # transformers.AutoModel of a causal LM's base is the bare LlamaModel: keys without 'model.'
    with pytest.raises(ValueError, match="name an 'architecture' callable"):
        check_architecture(transformers.AutoModel.from_pretrained(base_dir), base_dir, "model")


# ---------------------------------------------------------------------------------------------
# Row 7: --force onto an earlier adaptive OUT_DIR; row 9: modes
# ---------------------------------------------------------------------------------------------
def test_force_replaces_an_adaptive_out_dir_and_outputs_get_the_umask_modes(tmp_path):
    concrete = _digits_config(tmp_path, method="concrete_task_arithmetic", params={"steps": 1})
    out = tmp_path / "run"
    previous = os.umask(0o027)
    try:
        run_from_config(concrete, out, trust_code=True)
    finally:
        os.umask(previous)
    modes = {str(p.relative_to(out)): stat.S_IMODE(p.stat().st_mode) for p in out.rglob("*")}
    assert modes["mask.safetensors"] == modes["merged/model.safetensors"] == modes["checkpoint.pt"] == 0o640
    assert modes["report.json"] == 0o640 and modes["merged"] == 0o750

    (out / "notes.txt").write_text("earlier")
    run_from_config(_digits_config(tmp_path, params=STEPS), out, trust_code=True, force=True)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "merged", "report.json"]
    assert not _leftovers(out)


# ---------------------------------------------------------------------------------------------
# Row 8: SIGTERM / SIGKILL while a checkpoint or an output is written
# ---------------------------------------------------------------------------------------------
def _dying_at(where: str, sig: str) -> str:
    """A script that makes the first write at `where` ("checkpoint": torch.save of the checkpoint; "outputs":
    saving merged/) write half a file, then sends this process `sig`."""
    target = "torch.save" if where == "checkpoint" else "pyfuse.adaptive.loop.save_file"
    module, _, name = target.rpartition(".")
    return (f"import os, signal, importlib\nmodule = importlib.import_module({module!r})\n"
            f"def dying(obj, path, *args, **kwargs):\n    open(path, 'wb').write(b'half')\n"
            f"    os.kill(os.getpid(), signal.{sig})\nsetattr(module, {name!r}, dying)\n")


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGKILL"])
def test_a_run_killed_in_its_first_checkpoint_leaves_nothing_that_blocks_the_next(tmp_path, sig, capsys):
    config = _digits_config(tmp_path, params=STEPS)
    config["run"] = {**config["run"], "checkpoint_every": 1}
    cfg, out = _yaml(tmp_path, config), tmp_path / "run"
    args = ["merge", str(cfg), str(out), "--trust-code", "--no-progress"]
    killed = _in_process(args, _dying_at("checkpoint", sig))
    if sig == "SIGTERM":  # unwinds: one line, the temporary removed, the directory it created too
        assert killed.returncode == 130 and killed.stderr.strip() == "pyfuse merge: terminated (SIGTERM); " \
            "temporary files removed, nothing half-written kept", killed.stderr
        assert not out.exists() and not _leftovers(out)
    else:
        assert killed.returncode == -signal.SIGKILL
        assert [p.name for p in out.iterdir() if p.name.endswith(".tmp")]  # the half-written first checkpoint
    assert not lock_path(out).exists() or sig == "SIGKILL"
    assert main([*args, "--resume"]) == 1
    assert "nothing to resume: no checkpoint" in capsys.readouterr().err
    assert main(args) == 0  # no --force needed: a half-written first checkpoint is no checkpoint
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "merged", "report.json"]
    assert not _leftovers(out) and not lock_path(out).exists()


def test_a_run_killed_while_writing_its_outputs_is_resumed_and_cleaned(tmp_path):
    config = _digits_config(tmp_path, params=STEPS)
    cfg, out = _yaml(tmp_path, config), tmp_path / "run"
    args = ["merge", str(cfg), str(out), "--trust-code", "--no-progress"]
    killed = _in_process(args, _dying_at("outputs", "SIGKILL"))
    assert killed.returncode == -signal.SIGKILL
    assert [p.name for p in out.iterdir() if p.name.startswith(".merged.")]  # the half-written merged/
    assert main([*args, "--resume"]) == 0
    assert json.loads((out / "report.json").read_text())["resumed_from"] == 2
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "merged", "report.json"]
    assert not _leftovers(out)


# ---------------------------------------------------------------------------------------------
# Row 10: the output location, and Ctrl-C
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("out", [".", "..", "CWD"])
def test_the_current_directory_and_those_above_are_refused_up_front(tmp_path, monkeypatch, capsys, out):
    work = tmp_path / "work"
    work.mkdir()
    _models(work)
    (work / "keep.txt").write_text("mine")
    monkeypatch.chdir(work)
    # the engine's write room refuses it before its work starts (`_write`: reading, merging, writing)
    monkeypatch.setattr("pyfuse.engine.write._write", lambda *a, **k: pytest.fail("the merge ran"))
    target = str(work) if out == "CWD" else out
    assert main(["merge", str(_config(work)), target, "--force", "--no-progress"]) == 1
    assert "it is the current directory or one above it" in capsys.readouterr().err
    config = _digits_config(work, params=STEPS)
    monkeypatch.setattr("pyfuse.runner.model_and_tasks", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(ValueError, match="the current directory or one above it"):
        run_from_config(config, target, trust_code=True, force=True)
    assert (work / "keep.txt").read_text() == "mine"


def test_ctrl_c_prints_one_line(tmp_path, monkeypatch, capsys):
    config = _digits_config(tmp_path, params=STEPS)

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("pyfuse.adaptive.loop.AdaptiveLoop.meta_step", interrupted)
    monkeypatch.setattr("pyfuse.adaptive.loop.AdaptiveLoop.adapt_step", interrupted)
    out = tmp_path / "run"
    assert main(["merge", str(_yaml(tmp_path, config)), str(out), "--trust-code", "--no-progress"]) == 130
    assert capsys.readouterr().err == ("pyfuse merge: interrupted (Ctrl-C); temporary files removed, nothing "
                                       "half-written kept\n")
    assert not out.exists() and not lock_path(out).exists()
