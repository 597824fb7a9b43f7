"""Outputs that are never seen half-written: a temp file (or directory) beside the target, then a rename.

The temp names are created with the modes `open` and `mkdir` use (0666 / 0777 less the umask: 0644 /
0755 usually), not tempfile's private 0600 / 0700, so an output is as readable as any file the user writes.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success it is synced and renamed onto `path`, else removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(path)
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # writers that replace the file (safetensors) create it 0600
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp directory beside `path`; on success it replaces `path` (an older one is removed after)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(path)
    tmp.mkdir(0o777)
    try:
        yield tmp
        _apply_umask_modes(tmp)
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / path.name)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


PARTIAL_TAG = ".partial-"
REPLACED_TAG = ".replaced-"
# what atomic_path and atomic_dir leave when their process dies: `.NAME.<12 hex>.tmp`, `.NAME.<random>.old`
_TEMPORARY = re.compile(r"\..+\.([0-9a-f]{12}\.tmp|[a-z0-9_]{8}\.old)")


@dataclass(frozen=True)
class OutputDir:
    """An output directory that `check_output_dir` cleared for writing: what `commit_dir` may replace."""

    path: Path
    replaces: tuple[int, int] | None  # (device, inode) of the existing directory --force allows replacing
    removed: tuple[Path, ...] = ()  # what killed runs had left, removed when this run took the lock

    def partial_name(self) -> Path:
        """A hidden sibling to write into; the pid in its name lets a later run tell whether it is stale."""
        return self.path.parent / f".{self.path.name}{PARTIAL_TAG}{os.getpid()}-{uuid.uuid4().hex[:8]}"


def check_output_dir(path: str | os.PathLike, force: bool = False,
                     inputs: Iterable[str | os.PathLike] = ()) -> OutputDir:
    """Clear `path` for writing before any work starts, or raise naming what is in the way.

    Refused: an existing `path` without `force`; anything but a directory there; a path holding one of
    `inputs` (files or directories the run reads, which replacing it would delete), even with `force`;
    a location that cannot be created (a parent that is a file, or not writable).
    """
    out = Path(path)
    target = out.resolve()
    here = Path.cwd().resolve()
    if out.name in ("", ".", "..") or target == here or target in here.parents:
        raise ValueError(f"refusing to write {path}: it is the current directory or one above it; name a new "
                         "directory")
    for item in inputs:
        resolved = Path(item).resolve()
        if resolved == target or target in resolved.parents:
            raise ValueError(f"refusing to write {out}: it holds the input {item}, which this run reads "
                             "(replacing the directory would delete it)")
    replaces = None
    if out.exists() or out.is_symlink():
        if not force:
            raise FileExistsError(f"{out} already exists; choose another output or pass --force (force=True)")
        if out.is_symlink() or not out.is_dir():
            raise FileExistsError(f"{out} exists and is not a directory; refusing to replace it")
        status = out.stat()
        replaces = (status.st_dev, status.st_ino)
    parent = target.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise NotADirectoryError(f"cannot create {out}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot create {out}: {parent} is not writable")
    return OutputDir(out, replaces)


def remove_stale_partials(out: OutputDir) -> list[Path]:
    """Remove the temporary directories of `out` left by runs that were killed (their process is gone)."""
    removed = []
    if not out.path.parent.is_dir():
        return removed
    for tag in (PARTIAL_TAG, REPLACED_TAG):
        for candidate in out.path.parent.glob(f".{glob.escape(out.path.name)}{tag}*"):
            pid = candidate.name[len(f".{out.path.name}{tag}"):].partition("-")[0]
            if candidate.is_dir() and not candidate.is_symlink() and pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(candidate)
                removed.append(candidate)
    return removed


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Remove what killed runs left of the output directory `path`: its partial and replaced siblings
    (`remove_stale_partials`) and, inside it, the temporary files of `atomic_path` and `atomic_dir`. A
    directory that then holds nothing (its first checkpoint was never completed) is removed too.

    Only for the holder of `path`'s lock (`pyfuse.io.lock`): every temporary inside is then a dead run's.
    """
    out = Path(path)
    removed = remove_stale_partials(OutputDir(out, None))
    if not out.is_dir() or out.is_symlink():
        return removed
    inside = [entry for entry in out.iterdir() if _TEMPORARY.fullmatch(entry.name)]
    for entry in inside:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    removed += inside
    if inside and not any(out.iterdir()):
        out.rmdir()
        removed.append(out)
    return removed


def remove_replaced(out: OutputDir) -> None:
    """Remove the existing directory `check_output_dir` cleared for replacing (--force), before a run that writes
    into `out.path` directly (an adaptive one) starts writing; refused, naming it, if it is not that one."""
    old = _set_aside(out)
    if old is not None:
        shutil.rmtree(old)


def commit_dir(tmp: Path, out: OutputDir) -> Path:
    """Rename the completed directory `tmp` to `out.path`, replacing only the directory that was checked.

    A directory that appeared at the output (or replaced the checked one) since `check_output_dir` is
    left alone and the commit refused, naming it.
    """
    path = out.path
    old = _set_aside(out)
    os.rename(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(path.parent)
    return path


def _set_aside(out: OutputDir) -> Path | None:
    """Rename the directory at `out.path` to a hidden sibling (pid in its name, so a later run removes it if
    this one dies), provided it is the one that was checked; returns the sibling, or None when nothing is there."""
    path = out.path
    if not (path.exists() or path.is_symlink()):
        return None
    status = path.lstat()
    if out.replaces != (status.st_dev, status.st_ino):
        raise FileExistsError(f"{path} appeared while this run was writing it; not replacing it "
                              f"(run again, with --force to replace it)")
    old = path.parent / f".{path.name}{REPLACED_TAG}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    os.rename(path, old)
    return old


def _umask() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # no way to read it without setting it elsewhere
    os.umask(mask)
    return mask


def _apply_umask_modes(root: Path) -> None:
    """The modes `open` and `mkdir` give, on everything under `root` (writers may create files 0600)."""
    mask = _umask()
    os.chmod(root, 0o777 & ~mask)
    for directory, dirs, files in os.walk(root):
        for name in dirs:
            os.chmod(os.path.join(directory, name), 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(directory, name), 0o666 & ~mask)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _temp_name(path: Path) -> Path:
    return path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}.tmp"


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
