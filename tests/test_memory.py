"""`pyfuse.memory.disk_buffer` and the disk-backed base and task vectors of an adaptive run (`base_on_disk`,
`vectors_on_disk`): file pages instead of anonymous memory, the same results, and the refusals (a file system in
memory, a full disk, a GPU run, factored task vectors)."""

from __future__ import annotations

import os

import pytest
import torch

import pyfuse
from pyfuse import memory
from pyfuse.adaptive import AdaptiveLoop, RunOptions, Settings
from pyfuse.config import run_from_config
from pyfuse.memory import disk_buffer, is_disk_backed, status_bytes

from .adaptive_helpers import CLIP_TASKS, clip_state_dicts, clip_task, save_clip_dirs, tiny_clip

MIB = 2**20


def test_disk_buffer_holds_its_values_in_file_pages_and_leaves_no_file(disk_path):
    numel = 16 * MIB  # 64 MiB of fp32
    values = torch.arange(numel, dtype=torch.float64).mul_(0.5)
    buffer = disk_buffer(numel, torch.float32, disk_path)
    anon, file = status_bytes("RssAnon"), status_bytes("RssFile")  # before any page of the buffer is touched
    assert torch.count_nonzero(buffer) == 0 and is_disk_backed(buffer)
    assert list(disk_path.iterdir()) == []  # unlinked at once
    buffer.copy_(values)
    assert status_bytes("RssFile") - file >= 60 * MIB  # the buffer's pages are the file's
    assert status_bytes("RssAnon") - anon < 16 * MIB
    assert torch.equal(buffer[-3:], torch.tensor([numel - 3, numel - 2, numel - 1], dtype=torch.float32) * 0.5)
    assert not is_disk_backed(torch.zeros(3))


def test_disk_buffer_goes_beside_a_path_not_created_yet(disk_path):
    buffer = disk_buffer(10, torch.bfloat16, disk_path / "out" / "run")
    assert buffer.dtype == torch.bfloat16 and buffer.shape == (10,) and is_disk_backed(buffer)
    assert list(disk_path.iterdir()) == []  # neither the file nor the directories it was named for


def test_disk_buffer_refuses_a_file_system_in_memory_and_a_full_disk(disk_path, monkeypatch):
    if memory.filesystem_type("/dev/shm") != "tmpfs":
        pytest.skip("no tmpfs at /dev/shm here")
    with pytest.raises(ValueError, match="/dev/shm is on tmpfs, which keeps its files in memory"):
        disk_buffer(10, torch.float32, "/dev/shm")
    with pytest.raises(ValueError, match="/dev/shm is on tmpfs"):
        disk_buffer(10, torch.float32, "/dev/shm/not/yet")

    class Usage:
        free = 1000

    monkeypatch.setattr(memory.shutil, "disk_usage", lambda path: Usage)
    with pytest.raises(OSError, match=f"{disk_path}: a disk-backed buffer needs 4,000 bytes, 1,000 are free"):
        disk_buffer(1000, torch.float32, disk_path)
    assert list(disk_path.iterdir()) == []


def test_filesystem_type_takes_the_longest_mount_point(tmp_path):
    assert memory.filesystem_type("/proc/self") == "proc"
    assert memory.filesystem_type(tmp_path) not in (None, "proc")


def _loop(task_vectors, options):
    settings = Settings(method="concrete_adamerging", coefficients="layer", meta_steps=2, inner_steps=1,
                        eval_mask="relaxed", seed=3)
    tasks = [clip_task(name) for name in CLIP_TASKS]
    return AdaptiveLoop(tiny_clip(), task_vectors, tasks, settings, options)


def test_disk_backed_buffers_give_the_same_run_bit_for_bit(disk_path):
    base, finetuned = clip_state_dicts()
    in_memory = pyfuse.TaskVectors.from_models(base, finetuned, names=list(CLIP_TASKS), dtype=torch.bfloat16)
    on_disk = pyfuse.TaskVectors.from_models(base, finetuned, names=list(CLIP_TASKS), dtype=torch.bfloat16,
                                             base_dir=disk_path, vectors_dir=disk_path)
    assert is_disk_backed(on_disk.base) and is_disk_backed(on_disk.vectors)
    assert not is_disk_backed(in_memory.base) and not is_disk_backed(in_memory.vectors)
    assert torch.equal(on_disk.base, in_memory.base) and torch.equal(on_disk.vectors, in_memory.vectors)
    assert list(disk_path.iterdir()) == []
    assert on_disk.on_disk(disk_path, vectors=True) is on_disk  # nothing left to move

    out = disk_path / "out"
    runs = []
    for task_vectors, options, expected in (
            (in_memory, RunOptions(progress=False, backend="cpp"), (False, False)),
            (on_disk, RunOptions(progress=False, backend="cpp"), (True, True)),
            (in_memory, RunOptions(progress=False, backend="cpp", base_on_disk=True, out_dir=out), (True, False)),
            (in_memory, RunOptions(progress=False, backend="cpp", vectors_on_disk=True, out_dir=out), (False, True))):
        loop = _loop(task_vectors, options)
        held = loop.merger.task_vectors
        assert (is_disk_backed(held.base), is_disk_backed(held.vectors)) == expected
        runs.append([loop.meta_step(t) for t in range(2)] + [loop.merged_flat()])
    assert not out.exists()
    for run in runs[1:]:
        assert run[:2] == runs[0][:2]
        assert torch.equal(run[2], runs[0][2])


def test_factored_task_vectors_stay_factored_in_memory(disk_path):
    from pyfuse.models.lora import LoraAdapter

    model = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Linear(4, 3))
    factors = {"0.weight": (torch.randn(2, 6), torch.randn(4, 2)), "1.weight": (torch.randn(2, 4), torch.randn(3, 2))}
    task_vectors = pyfuse.TaskVectors.from_lora(model, [LoraAdapter("a", factors, 2, 1.0)])
    assert task_vectors.factored
    with pytest.raises(ValueError, match="factored LoRA task vectors are kept as their factors .* only dense"):
        task_vectors.on_disk(disk_path, vectors=True)
    assert is_disk_backed(task_vectors.on_disk(disk_path).base)


def test_disk_backed_buffers_are_refused_without_out_dir_or_off_the_cpu(tmp_path):
    base, finetuned = clip_state_dicts()
    task_vectors = pyfuse.TaskVectors.from_models(base, finetuned, names=list(CLIP_TASKS))
    for option in ("base_on_disk", "vectors_on_disk"):
        with pytest.raises(ValueError, match="base_on_disk and vectors_on_disk put their buffers beside out_dir"):
            _loop(task_vectors, RunOptions(progress=False, **{option: True}))
        with pytest.raises(ValueError, match=f"{option} must be true or false"):
            RunOptions(**{option: "yes"})
    for option in ("base_dir", "vectors_dir"):
        with pytest.raises(ValueError, match="disk-backed buffers .base_dir, vectors_dir. are CPU buffers, not ones "
                                             "on cuda"):
            pyfuse.TaskVectors.from_models(base, finetuned, device="cuda", **{option: tmp_path})


def test_a_config_run_with_buffers_on_disk_builds_them_there(disk_path, monkeypatch):
    root = save_clip_dirs(disk_path / "clip")
    config = {
        "method": "concrete_task_arithmetic", "base": str(root / "base"),
        "models": {name: str(root / name) for name in CLIP_TASKS},
        "tasks": {name: {"factory": "tests.adaptive_helpers:clip_task", "kwargs": {"name": name}}
                  for name in CLIP_TASKS},
        "parameters": {"steps": 1, "seed": 1},
        "run": {"progress": False, "backend": "cpp", "base_on_disk": True, "vectors_on_disk": True},
    }
    built = []
    real = pyfuse.TaskVectors.from_models.__func__

    def spy(cls, *args, **kwargs):
        built.append((kwargs.get("base_dir"), kwargs.get("vectors_dir")))
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(pyfuse.TaskVectors, "from_models", classmethod(spy))
    on_disk = run_from_config(config, disk_path / "disk", trust_code=True)
    assert built == [(disk_path / "disk", disk_path / "disk")]
    config["run"].update(base_on_disk=False, vectors_on_disk=False)
    in_memory = run_from_config(config, disk_path / "memory", trust_code=True)
    assert built[-1] == (None, None)
    assert torch.equal(on_disk.flat, in_memory.flat) and torch.equal(on_disk.logits, in_memory.logits)
    assert not any(p.name.startswith(".pyfuse-buffer") for p in disk_path.rglob("*"))

    if memory.filesystem_type("/dev/shm") == "tmpfs" and os.access("/dev/shm", os.W_OK):
        config["run"]["base_on_disk"] = True
        with pytest.raises(ValueError, match="is on tmpfs, which keeps its files in memory"):
            run_from_config(config, "/dev/shm/pyfuse-test-out", trust_code=True)
        assert not os.path.exists("/dev/shm/pyfuse-test-out")
