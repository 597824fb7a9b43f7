"""Atomic outputs: whole or absent, and created with the modes ordinary files and directories get."""

from __future__ import annotations

import contextlib
import os
import stat

import pytest

from pyfuse.io.atomic import atomic_dir, atomic_path


@contextlib.contextmanager
def _umask(mask: int):
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o077])
def test_outputs_get_the_modes_open_and_mkdir_give(tmp_path, mask):
    with _umask(mask):
        with atomic_path(tmp_path / "report.json") as tmp:
            tmp.write_text("{}")
        with atomic_dir(tmp_path / "merged") as tmp:
            (tmp / "config.json").write_text("{}")
        with open(tmp_path / "plain.txt", "w") as f:  # the reference: what the user's own files get
            f.write("x")
        os.mkdir(tmp_path / "plain")
    mode = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert mode["report.json"] == mode["plain.txt"] == 0o666 & ~mask
    assert mode["merged"] == mode["plain"] == 0o777 & ~mask
    assert sorted(mode) == ["merged", "plain", "plain.txt", "report.json"]  # no temp names left


def test_a_failed_write_leaves_the_old_output_and_no_temp(tmp_path):
    target = tmp_path / "report.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "merged") as tmp:
        (tmp / "a").write_text("half")
        raise RuntimeError("interrupted")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]
