"""The streaming engine: bit for bit the in-memory merge, loadable with from_pretrained, atomic, and strict."""

import hashlib
import json

import pytest
import torch
from safetensors.torch import save_file

import pyfuse
from pyfuse.merge import merge_to_dir, plan_merge
from pyfuse.methods.ties import Ties

from .merge_helpers import load_dir, save_family, tiny_clip, tiny_llama


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return save_family(tiny_llama, tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return save_family(tiny_clip, tmp_path_factory.mktemp("clip"))


def _no_leftovers(parent):
    return not [p for p in parent.iterdir() if ".partial-" in p.name or ".replaced-" in p.name]


CASES = [
    ("llama", "ties", {"density": 0.3}),
    ("llama", "ties", {"density": 0.5, "trim": "tensor"}),
    ("llama", "task_arithmetic", {"scaling": 0.5, "weights": [1.0, 0.5]}),
    ("llama", "dare", {"p": 0.3, "then": "ties", "merge_func": "max"}),
    ("llama", "concrete", {"mask": "hard"}),
    ("clip", "ties", {"density": 0.2, "merge_func": "mean"}),
    ("clip", "average", {}),
]


@pytest.mark.parametrize("family,method,params", CASES, ids=[f"{f}-{m}-{'-'.join(p)}" for f, m, p in CASES])
def test_streaming_equals_in_memory_bit_for_bit(family, method, params, request, tmp_path):
    base_dir, dirs, base, states = request.getfixturevalue(family)
    if method == "concrete":  # a logits file, per parameter
        g = torch.Generator().manual_seed(3)
        logits = {k: torch.randn(v.shape, generator=g) for k, v in base.items()}
        save_file(logits, tmp_path / "logits.safetensors")
        params = dict(params, logits=tmp_path / "logits.safetensors")
        in_memory = pyfuse.merge(method, base, states, **dict(params, logits=logits))
    else:
        in_memory = pyfuse.merge(method, base, states, **params)
    # small chunks and small shards: every tensor crosses chunk boundaries, the output several shards
    plan = plan_merge(method, base_dir, dirs, chunk_elements=1000, **params)
    report = plan.write(tmp_path / "out", shard_size="30KB")
    streamed = load_dir(tmp_path / "out")
    assert streamed.keys() == in_memory.keys()
    for key, value in in_memory.items():
        assert torch.equal(streamed[key], value), key
    shards = report["output"]["shards"]
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(in_memory) and set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in in_memory.values())
    assert _no_leftovers(tmp_path)


def test_output_loads_with_from_pretrained(llama, clip, tmp_path):
    import transformers

    for (base_dir, dirs, base, states), cls in ((llama, transformers.LlamaForCausalLM),
                                                (clip, transformers.CLIPModel)):
        out = tmp_path / cls.__name__
        merge_to_dir("ties", base_dir, dirs, out, density=0.5, dtype="bfloat16")
        assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
        assert (out / "tokenizer.json").read_text() == (base_dir / "tokenizer.json").read_text()
        model = cls.from_pretrained(out)
        expected = pyfuse.merge("ties", base, states, density=0.5, dtype="bfloat16")
        loaded = model.state_dict()
        assert model.dtype == torch.bfloat16
        for key, value in expected.items():
            assert torch.equal(loaded[key], value), key


def test_report(llama, tmp_path):
    base_dir, dirs, _, _ = llama
    report = merge_to_dir("ties", base_dir, dirs, tmp_path / "out", density=0.4)
    assert json.loads((tmp_path / "out" / "merge_report.json").read_text()) == report
    assert report["method"] == "ties" and report["parameters"]["density"] == 0.4
    assert report["parameters"]["trim"] == "global" and report["global_passes"] == 3
    first = report["inputs"][0]["files"][0]
    assert first["sha256"] == hashlib.sha256((base_dir / first["name"]).read_bytes()).hexdigest()
    assert [entry["role"] for entry in report["inputs"]] == ["base", "fine-tuned", "fine-tuned"]
    assert {"hash_s", "prepare_s", "merge_s", "total_s"} <= set(report["timings"])
    assert report["peak_rss_anon_bytes"] > 0 and report["predicted_peak_rss_anon_bytes"] > 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "config.json", "generation_config.json", "merge_report.json", "model-00001-of-00001.safetensors",
        "model.safetensors.index.json", "tokenizer.json"]


def test_single_files_and_carried_tensors(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(40, 30, generator=g).bfloat16(), "steps": torch.arange(4), "empty": torch.zeros(0)}
    fts = [dict(base, w=(base["w"].float() + torch.randn(40, 30, generator=g)).bfloat16()) for _ in range(2)]
    paths = []
    for i, sd in enumerate([base, *fts]):
        paths.append(tmp_path / f"m{i}.safetensors")
        save_file(sd, paths[-1])
    merge_to_dir("task_arithmetic", paths[0], paths[1:], tmp_path / "out")
    streamed = load_dir(tmp_path / "out")
    expected = pyfuse.merge("task_arithmetic", base, fts)
    assert streamed.keys() == expected.keys() == base.keys()
    assert all(torch.equal(streamed[k], expected[k]) for k in base)
    assert streamed["w"].dtype == torch.bfloat16 and torch.equal(streamed["steps"], base["steps"])
    assert not (tmp_path / "out" / "config.json").exists()  # nothing to copy beside single files


def test_existing_output_is_replaced_only_with_force(llama, tmp_path):
    base_dir, dirs, _, _ = llama
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="already exists"):
        merge_to_dir("average", base_dir, dirs, out)
    assert (out / "keep.txt").read_text() == "mine"
    merge_to_dir("average", base_dir, dirs, out, force=True)
    assert not (out / "keep.txt").exists() and (out / "merge_report.json").exists()
    assert _no_leftovers(tmp_path)
    with pytest.raises(ValueError, match="holds the input"):
        merge_to_dir("average", base_dir, dirs, dirs[1], force=True)
    assert (dirs[1] / "config.json").exists()


def test_a_failure_leaves_nothing_behind(llama, tmp_path, monkeypatch):
    base_dir, dirs, _, _ = llama
    calls = []

    def failing(self, chunk, plan):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("disk on fire")
        return chunk.base

    monkeypatch.setattr(Ties, "merge_chunk", failing)
    with pytest.raises(RuntimeError, match="disk on fire"):
        merge_to_dir("ties", base_dir, dirs, tmp_path / "out", threads=1)
    assert not (tmp_path / "out").exists() and _no_leftovers(tmp_path)


def test_bad_inputs(llama, tmp_path):
    base_dir, dirs, base, states = llama
    with pytest.raises(FileNotFoundError, match="nowhere: no such file or directory"):
        merge_to_dir("ties", base_dir, [dirs[0], tmp_path / "nowhere"], tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="only safetensors checkpoints are read"):
        pyfuse.merge("ties", base_dir, [tmp_path / "empty"])
    key = "model.layers.1.mlp.up_proj.weight"
    missing = {k: v for k, v in states[0].items() if k != key}
    save_file(missing, tmp_path / "missing.safetensors")
    with pytest.raises(KeyError, match=f"fine-tuned model 2 .*missing.safetensors.*: missing tensor '{key}'"):
        pyfuse.merge("ties", base_dir, [dirs[0], tmp_path / "missing.safetensors"])
    save_file(dict(states[0], **{key: torch.zeros(3, 3)}), tmp_path / "shape.safetensors")
    with pytest.raises(ValueError, match=rf"tensor '{key}' has shape \[3, 3\], expected \[48, 32\]"):
        pyfuse.merge("ties", base_dir, [tmp_path / "shape.safetensors"])
    save_file(dict(states[0], **{key: torch.zeros(48, 32, dtype=torch.int8)}), tmp_path / "int.safetensors")
    with pytest.raises(TypeError, match=f"tensor '{key}' is torch.int8, expected a floating dtype"):
        pyfuse.merge("ties", base_dir, [tmp_path / "int.safetensors"])
    with pytest.raises(ValueError, match=r"ties: density must be in \(0, 1\], got 1.5"):
        merge_to_dir("ties", base_dir, dirs, tmp_path / "out", density=1.5)
    assert not (tmp_path / "out").exists()
