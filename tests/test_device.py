"""One device option for every merge kind (`pyfuse.device`, `RunOptions.device`, `--device`): the adaptive run's
tensors on the requested device (the CPU explicitly, and the meta device to prove the plumbing moves everything),
mixed precision for the model's forward only, `LOCAL_RANK`'s GPU under torchrun, and the refusal of options that
do not apply to a method kind (the data-aware and task-data kinds on a device: tests/test_device_data.py)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import yaml

import pyfuse
from pyfuse import device as device_module
from pyfuse.adaptive import loop as loop_module
from pyfuse.adaptive.loop import AdaptiveLoop, RunOptions, Settings
from pyfuse.cli import main
from pyfuse.demo import DemoSettings
from pyfuse.device import OnDevice, place_run, resolve_device, to_device
from pyfuse.method_kinds import refuse_inapplicable
from pyfuse.ops.backends import resolve

from .adaptive_helpers import CLIP_TASKS, clip_problem, save_clip_dirs
from .test_lora_factored import adapters

SETTINGS = Settings(method="concrete_adamerging", coefficients="layer", meta_steps=2, inner_steps=1, adapt_steps=2,
                    eval_mask="relaxed", inner_lr=0.1, mask_lr=0.1, lr=0.1)


def _devices_of(loop: AdaptiveLoop) -> dict[str, set[torch.device]]:
    """Where every tensor of a loop lives: task vectors, learned parameters, optimiser state, model."""
    m = loop.merger
    tv = m.task_vectors
    vectors = [tv.vectors] if isinstance(tv.vectors, torch.Tensor) else [tv.vectors.left, tv.vectors.right]
    state = [value for opt in loop.optimizers.values() for per_param in opt.state.values()
             for value in per_param.values() if isinstance(value, torch.Tensor) and value.dim() > 0]
    return {
        "base and carried tensors": {tv.base.device, *(t.device for t in tv.carried.values())},
        "vectors": {v.device for v in vectors},
        "logits": {m.logits.device}, "coefficients": {m.coefficients.device}, "offsets": {m.offsets.device},
        "optimizer state": {t.device for t in state},
        "model": {t.device for t in [*m.model.parameters(), *m.model.buffers()]},
    }


def test_an_adaptive_run_on_the_explicit_cpu_device_keeps_every_tensor_there():
    model, tv, tasks = clip_problem()
    seen: list[torch.device] = []

    def recording(task):
        def logits(call, batch):
            seen.append(batch.device)
            out = task.logits(call, batch)
            seen.append(out.device)
            return out
        return pyfuse.Task(task.name, task.batches, logits, task.test_data)

    loop = AdaptiveLoop(model, tv, [recording(t) for t in tasks], SETTINGS,
                        RunOptions(device="cpu", progress=False, backend="reference"))
    result = loop.run()
    cpu = torch.device("cpu")
    for what, found in _devices_of(loop).items():
        assert found == {cpu}, what
    assert _devices_of(loop)["optimizer state"], "the optimisers hold state after a run"
    assert set(seen) == {cpu} and len(seen) > 2 * len(CLIP_TASKS)
    assert result.flat.device == cpu and result.report["device"] == "cpu"


def test_the_loop_puts_task_vectors_model_parameters_and_batches_on_the_requested_device(monkeypatch):
    """The meta device stands in for a GPU: nothing computes there, but every tensor the loop set up must be
    there, which a forgotten `.to` or a tensor created without `device=` would break."""
    monkeypatch.setattr(loop_module, "resolve_device", torch.device)  # meta is refused to users (below)
    model, tv, tasks = clip_problem()
    loop = AdaptiveLoop(model, tv, tasks, SETTINGS, RunOptions(device="meta", progress=False, backend="reference"))
    meta = torch.device("meta")
    for what, found in _devices_of(loop).items():
        if what != "optimizer state":  # created at the first step, next to the parameters (checked on the CPU)
            assert found == {meta}, what
    assert loop.device == meta and loop.backend == "reference"
    for stream in loop.streams:
        assert stream.next().device == meta
    for task in loop.tasks:
        batch, labels = next(iter(task.test_data))
        assert batch.device == meta and labels.device == meta
    assert tv.base.device.type == "cpu", "the caller's task vectors are not modified"


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")
def test_factored_lora_task_vectors_move_whole(tmp_path, monkeypatch):
    """Base and carried tensors move here; the factors move through their own `LoraFactors.to` (whose checks
    read values, so the meta device cannot hold them: the call is what is checked)."""
    from pyfuse.ops import LoraFactors

    from .test_lora import tiny_t5

    base = tiny_t5()
    base.save_pretrained(tmp_path / "base")
    factored = pyfuse.TaskVectors.from_lora(tmp_path / "base", adapters(base, tmp_path), names=["a", "b", "c"])
    assert factored.carried, "the tiny T5 has tensors no adapter targets"
    moves = []
    monkeypatch.setattr(LoraFactors, "to", lambda self, device=None, dtype=None: moves.append(device) or self)
    moved, _ = place_run(torch.nn.Linear(2, 2), factored, [], "meta")
    assert moves == [torch.device("meta")]
    assert {t.device.type for t in [moved.base, *moved.carried.values()]} == {"meta"}
    assert moved.names == factored.names and moved.layout is factored.layout
    assert factored.to("cpu") is factored  # already there: no copy


def test_to_device_reaches_every_tensor_of_a_batch():
    from collections import namedtuple

    Pair = namedtuple("Pair", "x y")
    batch = {"ids": torch.ones(2), "nested": [torch.zeros(1), (torch.ones(1), "text")], "pair": Pair(torch.ones(1), 3)}
    moved = to_device(batch, torch.device("meta"))
    assert moved["ids"].is_meta and moved["nested"][0].is_meta and moved["nested"][1][0].is_meta
    assert moved["nested"][1][1] == "text" and isinstance(moved["pair"], Pair) and moved["pair"].x.is_meta
    assert moved["pair"].y == 3 and not batch["ids"].is_meta
    items = OnDevice([torch.ones(1), torch.ones(2)], torch.device("meta"))
    assert [t.is_meta for t in items] == [True, True] and [t.is_meta for t in items] == [True, True]  # re-iterable


def test_autocast_runs_the_model_forward_in_bf16_and_leaves_the_merge_in_fp32():
    model, tv, tasks = clip_problem()
    dtypes: list[torch.dtype] = []

    def recording(task):
        def logits(call, batch):
            out = task.logits(call, batch)
            dtypes.append(out.dtype)
            return out
        return pyfuse.Task(task.name, task.batches, logits, task.test_data)

    # learning rates 0: the merged model is the merge of the initial values, so any effect of autocast on the
    # fused op (which must stay in fp32, outside the autocast region) would show as a difference
    frozen = dataclasses.replace(SETTINGS, inner_lr=0.0, mask_lr=0.0, lr=0.0)
    result = AdaptiveLoop(model, tv, [recording(t) for t in tasks], frozen,
                          RunOptions(progress=False, backend="reference", autocast="bf16")).run()
    assert set(dtypes) == {torch.bfloat16} and len(dtypes) > 2 * len(CLIP_TASKS)
    assert result.flat.dtype == torch.float32 and result.report["autocast"] == "bf16"
    plain = AdaptiveLoop(*clip_problem(), frozen, RunOptions(progress=False, backend="reference")).run()
    assert plain.report["autocast"] is None
    assert torch.equal(result.flat, plain.flat)
    assert result.report["entropy"]["value"] != plain.report["entropy"]["value"], "the forward did run in bf16"
    with pytest.raises(ValueError, match="autocast must be one of"):
        AdaptiveLoop(*clip_problem(), SETTINGS, RunOptions(progress=False, autocast="int8"))


def test_devices_are_checked_before_any_work(monkeypatch):
    for bad in ("tpu", "meta", "gpu0"):
        with pytest.raises(ValueError, match="device must be cpu, cuda or cuda:N"):
            resolve_device(bad)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="no CUDA device"):
        resolve_device("cuda")


def test_under_torchrun_a_bare_cuda_is_the_gpu_of_local_rank(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert resolve_device("cuda") == torch.device("cuda", 2)
    assert resolve_device("cuda:3") == torch.device("cuda", 3)  # an explicit index is kept
    with pytest.raises(RuntimeError, match="sees 4 CUDA"):
        resolve_device("cuda:7")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert resolve_device("cuda") == torch.device("cuda")


def test_distributed_group_takes_nccl_and_the_local_gpu_for_cuda(monkeypatch):
    from pyfuse import distributed

    calls = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.torch.cuda, "set_device", lambda index: calls.setdefault("gpu", index))
    monkeypatch.setattr(distributed.dist, "init_process_group",
                        lambda backend, timeout: calls.setdefault("backend", backend))
    monkeypatch.setattr(distributed.dist, "get_rank", lambda: 1)
    monkeypatch.setattr(distributed.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(distributed.dist, "destroy_process_group", lambda: None)
    with distributed.group("cuda") as ranks:
        assert ranks.backend == "nccl"
    assert calls == {"gpu": 1, "backend": "nccl"}


def test_auto_picks_the_triton_backend_on_cuda():
    pytest.importorskip("triton")
    assert resolve("auto", torch.device("cuda")) == "triton"
    assert resolve("auto", torch.device("cpu")) in ("cpp", "reference")


# ---------------------------------------------------------------------------------------------
# The command line: every option works for a method kind or is refused, naming option and method
# ---------------------------------------------------------------------------------------------
def _write_config(tmp_path, config) -> str:
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.fixture
def static_config(tmp_path):
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(4, 3, generator=generator)}
    for name, state in (("base", base), ("a", {"w": base["w"] + 0.1}), ("b", {"w": base["w"] - 0.2})):
        save_file(state, str(tmp_path / f"{name}.safetensors"))
    return _write_config(tmp_path, {"method": "task_arithmetic", "base": "base.safetensors",
                                    "models": ["a.safetensors", "b.safetensors"]})


@pytest.mark.parametrize("option, message", [
    (["--resume"], "--resume does not apply to task_arithmetic (static)"),
    (["--autocast", "bf16"], "--autocast does not apply to task_arithmetic (static)"),
    (["--trust-code"], "--trust-code does not apply to task_arithmetic (static)"),
])
def test_static_merges_refuse_what_applies_to_adaptive_methods_only(static_config, tmp_path, capsys, option,
                                                                    message):
    assert main(["merge", static_config, str(tmp_path / "out"), *option]) == 1
    assert message in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_static_merge_on_the_explicit_cpu_device(static_config, tmp_path, monkeypatch):
    import pyfuse.engine.read as engine_read

    seen = []
    real = engine_read._merge_chunk

    def merge_chunk(job, chunk, plan, dtype):
        seen.append((job.device, chunk.base.device, chunk.deltas.device))
        return real(job, chunk, plan, dtype)

    monkeypatch.setattr(engine_read, "_merge_chunk", merge_chunk)
    assert main(["merge", static_config, str(tmp_path / "out"), "--device", "cpu", "--no-progress"]) == 0
    report = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    assert report["device"] == "cpu"
    assert seen and set(seen) == {(torch.device("cpu"),) * 3}


def test_a_malformed_device_is_refused_by_the_parser(static_config, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["merge", static_config, str(tmp_path / "out"), "--device", "gpu"])
    assert "expected cpu, cuda or cuda:N" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where torch sees no GPU")
def test_cuda_without_a_gpu_fails_before_any_work(static_config, tmp_path, capsys):
    assert main(["merge", static_config, str(tmp_path / "out"), "--device", "cuda"]) == 1
    assert "torch reports no CUDA device" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_every_method_kind_takes_a_device(monkeypatch):
    """No kind is refused a device: the engine plans a data-aware and a task-data merge on a GPU (here one torch
    pretends to see; tests/test_device_data.py runs them on the meta device) and so does the demo's settings."""
    from pyfuse.engine import plan as plan_module
    from pyfuse.methods import get_method

    from .test_device_data import _clip_tasks, _problem
    from .test_method_regmean_plusplus import family

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    base, models, statistics = _problem()
    assert plan_module.plan_merge("regmean", base, models, statistics=statistics, device="cuda").device.type == "cuda"
    clip, fts = family(2)
    assert plan_module.plan_merge("regmean++", clip, fts, tasks=_clip_tasks(), device="cuda").device.type == "cuda"
    assert {get_method(m).kind for m in ("regmean", "regmean++")} == {"data", "task-data"}
    assert DemoSettings(methods=("fisher", "regmean", "esm++", "regmean++"), device="cuda").device == "cuda"


def test_option_table_refuses_each_inapplicable_option():
    for option, kinds in (("dtype", ("adaptive",)), ("no_hash", ("adaptive",)),
                          ("resume", ("static", "data", "task-data")),
                          ("autocast", ("static", "data", "task-data")),
                          ("trust_code", ("static", "data"))):
        for kind in kinds:
            with pytest.raises(ValueError, match=f"{option} does not apply to m \\({kind}\\)"):
                refuse_inapplicable({option: True}, "m", kind)
        refuse_inapplicable({option: False}, "m", kinds[0])  # not given: nothing to refuse


@pytest.fixture(scope="module")
def clip_dirs(tmp_path_factory):
    return save_clip_dirs(tmp_path_factory.mktemp("clip"))


def _adaptive_config(clip_dirs, tmp_path) -> str:
    from .test_adaptive_outputs import _clip_config

    config = _clip_config(clip_dirs, "concrete_adamerging",
                          {"granularity": "layer", "meta_steps": 1, "adamerging_steps": 1})
    config["run"] = {"backend": "reference", "checkpoint_every": 0}
    return _write_config(tmp_path, config)


@pytest.mark.parametrize("option, message", [
    (["--dtype", "bfloat16"], "--dtype does not apply to concrete_adamerging (adaptive)"),
    (["--no-hash"], "--no-hash does not apply to concrete_adamerging (adaptive)"),
    (["--dry-run"], "--dry-run is for the static methods"),
])
def test_adaptive_merges_refuse_what_does_not_apply(clip_dirs, tmp_path, capsys, option, message):
    config = _adaptive_config(clip_dirs, tmp_path)
    assert main(["merge", config, str(tmp_path / "out"), "--trust-code", *option]) == 1
    assert message in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_adaptive_merge_takes_device_autocast_threads_and_no_progress(clip_dirs, tmp_path, monkeypatch):
    threads_during: list[int] = []
    bars_disabled: list[bool] = []
    real_place, real_bar = device_module.place_run, loop_module.progress_bar

    def place(*args):
        threads_during.append(torch.get_num_threads())
        return real_place(*args)

    def bar(*args, **kwargs):
        bars_disabled.append(kwargs["disable"])
        return real_bar(*args, **kwargs)

    monkeypatch.setattr(loop_module, "place_run", place)
    monkeypatch.setattr(loop_module, "progress_bar", bar)
    before = torch.get_num_threads()
    config = _adaptive_config(clip_dirs, tmp_path)
    assert main(["merge", config, str(tmp_path / "out"), "--trust-code", "--device", "cpu", "--autocast", "bf16",
                 "--threads", "1", "--no-progress"]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["device"] == "cpu" and report["autocast"] == "bf16"
    assert threads_during == [1] and torch.get_num_threads() == before
    assert bars_disabled == [True]
    assert main(["merge", config, str(tmp_path / "out2"), "--trust-code"]) == 0  # without: a bar, no placement
    assert bars_disabled == [True, False] and threads_during == [1]


def test_demo_and_finetune_check_their_device_before_loading_anything(tmp_path, capsys, monkeypatch):
    import pyfuse.models.text_classifier as text_classifier

    def no_encoder(*args, **kwargs):
        raise AssertionError("the encoder was loaded before the device was checked")

    monkeypatch.setattr(text_classifier.TextEncoder, "__init__", no_encoder)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for command in (["demo", "--out", str(tmp_path / "demo")], ["demo", "--methods", "fisher", "--out",
                                                               str(tmp_path / "demo")], ["finetune"]):
        assert main([*command, "--device", "cuda", "--cache", str(tmp_path / "cache")]) == 1
        assert "torch reports no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists() and not (tmp_path / "cache").exists()
    assert DemoSettings(device="cuda").device == "cuda"  # the default methods all run on a GPU
