"""FlatLayout and TaskVectors: flattening, zero-copy views, building from models, and clear errors."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from pyfuse import FlatLayout, TaskVectors


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(5, 3)
        self.proj = torch.nn.Linear(3, 2)
        self.norm = torch.nn.LayerNorm(2)
        self.register_buffer("position_ids", torch.arange(4))


def models(n=2, seed=0):
    torch.manual_seed(seed)
    base = Tiny()
    tuned = []
    for _ in range(n):
        m = Tiny()
        m.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        tuned.append(m)
    return base, tuned


def test_layout_offsets_and_zero_copy_views():
    base, _ = models()
    layout = FlatLayout.from_module(base)
    assert layout.names == ("embed.weight", "norm.bias", "norm.weight", "proj.bias", "proj.weight")
    assert layout.offsets.tolist() == [0, 15, 17, 19, 21, 27]
    flat = layout.flatten(base.state_dict())
    views = layout.unflatten(flat)
    for name, tensor in views.items():
        assert torch.equal(tensor, base.state_dict()[name])
        assert tensor.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()
    flat[0] = 42.0
    assert views["embed.weight"][0, 0] == 42.0


def test_task_vectors_from_modules_dicts_and_files(tmp_path):
    base, tuned = models(3)
    paths = []
    for i, m in enumerate(tuned):
        paths.append(tmp_path / f"m{i}.safetensors")
        save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(paths[-1]))
    from_modules = TaskVectors.from_models(base, tuned, names=["a", "b", "c"])
    from_files = TaskVectors.from_models(base.state_dict(), paths)
    assert torch.equal(from_modules.vectors, from_files.vectors)
    assert from_files.names == ["task0", "task1", "task2"]
    for i, m in enumerate(tuned):
        sd, base_sd = m.state_dict(), base.state_dict()
        expected = torch.cat([(sd[k] - base_sd[k]).reshape(-1) for k in from_modules.layout.names])
        torch.testing.assert_close(from_modules.vectors[i], expected, rtol=0, atol=1e-7)
        rebuilt = from_modules.task_state_dict(i)
        torch.testing.assert_close(rebuilt["proj.weight"], m.proj.weight.detach())
    # integer buffers are carried from the base, not merged
    assert "position_ids" not in from_modules.layout.names
    assert torch.equal(from_modules.state_dict(from_modules.base)["position_ids"], torch.arange(4))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_task_vectors_low_precision_storage(dtype):
    base, tuned = models(2)
    full = TaskVectors.from_models(base, tuned)
    low = TaskVectors.from_models(base, tuned, dtype=dtype)
    assert low.vectors.dtype == dtype
    torch.testing.assert_close(low.vectors.float(), full.vectors, rtol=1e-2, atol=1e-3)


def test_task_vectors_peak_memory_is_near_the_buffers(tmp_path):
    import tracemalloc

    big = {f"layer{i}.weight": torch.randn(256, 256) for i in range(16)}
    base_path = tmp_path / "base.safetensors"
    save_file(big, str(base_path))
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"t{i}.safetensors")
        save_file({k: v + 0.01 * i for k, v in big.items()}, str(paths[-1]))
    del big
    tracemalloc.start()
    tv = TaskVectors.from_models(base_path, paths)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    buffers = tv.base.nbytes + tv.vectors.nbytes
    one_tensor = 256 * 256 * 4
    assert peak < buffers + 8 * one_tensor, (peak, buffers)


def test_errors_name_the_model_and_the_key(tmp_path):
    base, tuned = models(2)
    sd = dict(tuned[1].state_dict())
    missing = {k: v for k, v in sd.items() if k != "proj.bias"}
    with pytest.raises(KeyError, match=r"fine-tuned model 'b'.*missing tensor 'proj.bias'"):
        TaskVectors.from_models(base, [tuned[0], missing], names=["a", "b"])
    wrong_shape = {**sd, "proj.weight": torch.zeros(3, 3)}
    with pytest.raises(ValueError, match=r"'task1'.*'proj.weight' has shape \[3, 3\], expected \[2, 3\]"):
        TaskVectors.from_models(base, [tuned[0], wrong_shape])
    not_float = {**sd, "norm.bias": torch.zeros(2, dtype=torch.int64)}
    with pytest.raises(TypeError, match=r"'norm.bias' is torch.int64, expected a floating"):
        TaskVectors.from_models(base, [not_float])
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        TaskVectors.from_models(base, [tmp_path / "nope.safetensors"])
    with pytest.raises(TypeError, match="complex"):
        FlatLayout.from_state_dict({"w": torch.zeros(2, dtype=torch.complex64)})
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(ValueError, match="not a safetensors file"):
        TaskVectors.from_models(base, [garbage])
    with pytest.raises(ValueError, match="distinct task names"):
        TaskVectors.from_models(base, tuned, names=["a", "a"])
