"""One writer per output directory: an exclusive OS lock held from a run's first check to its commit.

The lock is `flock` on a hidden file beside the output (`.NAME.lock`), so static merges (which create the
output by renaming a finished directory onto it) and adaptive runs (which write into it) exclude each other.
The kernel releases the lock when its holder dies, so a killed run leaves no stale lock; the file holds
the holder's pid, for the refusal's message, and is removed on release.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from .atomic import OutputDir, check_output_dir, remove_stale_temporaries

LOCK_SUFFIX = ".lock"
_held: dict[Path, int] = {}  # lock files this process holds, and how many nested holds each has


class OutputLocked(RuntimeError):
    """Another process is writing the same output directory."""


def lock_path(out_dir: str | os.PathLike) -> Path:
    """The lock file of `out_dir`: beside it, so it exists before and after the directory does."""
    path = Path(os.path.abspath(out_dir))
    return path.parent / f".{path.name}{LOCK_SUFFIX}"


@contextlib.contextmanager
def output_lock(out_dir: str | os.PathLike) -> Iterator[Path]:
    """Hold `out_dir`'s exclusive lock (nested holds in one process share it), or refuse at once naming the
    holder's pid. An `out_dir` the holder created and left empty is removed on release."""
    path = lock_path(out_dir)
    if path in _held:
        _held[path] += 1
        try:
            yield path
        finally:
            _held[path] -= 1
        return
    check_output_dir(out_dir, force=True)  # a location that cannot be created fails here, with its reason
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = _acquire(path, out_dir)
    _held[path] = 1
    existed = os.path.lexists(out_dir)
    try:
        yield path
    finally:
        if not existed:  # a run that failed before writing anything leaves no empty directory behind
            with contextlib.suppress(OSError):
                os.rmdir(out_dir)
        del _held[path]
        # unlinked while still locked: a run that opened this file before sees it is gone and retries
        path.unlink(missing_ok=True)
        os.close(fd)


def _acquire(path: Path, out_dir: str | os.PathLike) -> int:
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            raise OutputLocked(f"{out_dir} is being written by another run (pid {holder or 'unknown'}, lock "
                               f"{path}); wait for it to finish or stop it") from None
        except BaseException:
            os.close(fd)
            raise
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:  # else the holder released and removed it between our open and flock: take a fresh one
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return fd
        os.close(fd)


@contextlib.contextmanager
def claimed_output_dir(out_dir: str | os.PathLike, force: bool = False,
                       inputs: Iterable[str | os.PathLike] = ()) -> Iterator[OutputDir]:
    """`check_output_dir` under `out_dir`'s lock, held until the block ends (the run's commit).

    Under the lock, the temporary files of killed runs are removed first (`remove_stale_temporaries`), so a
    directory that held nothing else (a first checkpoint that was never completed) counts as absent.
    """
    inputs = list(inputs)
    check_output_dir(out_dir, True, inputs)  # an input inside it is refused before anything is touched
    with output_lock(out_dir):
        removed = remove_stale_temporaries(out_dir)
        yield dataclasses.replace(check_output_dir(out_dir, force, inputs), removed=tuple(removed))
