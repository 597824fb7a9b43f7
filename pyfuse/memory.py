"""Process memory as reports and benchmarks measure it: anonymous memory (RssAnon), not max RSS, which
memory-mapped weights inflate; and `disk_buffer`, a tensor whose pages are file-backed rather than anonymous."""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from pathlib import Path

import torch

# File systems whose files live in memory: a buffer there would be as resident as an anonymous one.
MEMORY_FILESYSTEMS = ("tmpfs", "ramfs", "hugetlbfs")


def status_bytes(field: str, pid: int | str = "self") -> int | None:
    """A `/proc/<pid>/status` memory field (RssAnon, VmRSS, VmHWM, ...) in bytes; None off Linux or if gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def rss_anon_bytes(pid: int | str = "self") -> int | None:
    """Resident anonymous memory: heap and tensors, not file-backed pages such as mmapped weights."""
    return status_bytes("RssAnon", pid)


class PeakRssAnon:
    """Polls this process's RssAnon in a thread while the block runs: `start`, `peak`, and `extra` = peak - start.

    Works because torch ops and pyfuse's C++ op release the GIL while they compute. All three stay None
    where /proc is not available.
    """

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.start = self.peak = self.extra = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def _sample(self) -> None:
        now = rss_anon_bytes()
        if now is not None and (self.peak is None or now > self.peak):
            self.peak = now

    def __enter__(self) -> PeakRssAnon:
        self.start = self.peak = rss_anon_bytes()
        if self.start is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread.is_alive():
            self._stop.set()
            self._thread.join()
        self._sample()
        if self.start is not None:
            self.extra = self.peak - self.start


def filesystem_type(path: str | os.PathLike) -> str | None:
    """The type (ext4, tmpfs, ...) of the file system holding `path`, from /proc/self/mounts; None off Linux."""
    target = os.path.realpath(path)
    best, kind = "", None
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                fields = line.split()
                mount = fields[1].replace("\\040", " ")
                inside = target == mount or target.startswith(mount.rstrip("/") + "/")
                if inside and len(mount) >= len(best):
                    best, kind = mount, fields[2]
    except OSError:
        return None
    return kind


def nearest_directory(path: str | os.PathLike) -> Path:
    """`path` if it is a directory, else the nearest directory above it that exists."""
    path = Path(path).absolute()
    while not path.is_dir() and path != path.parent:
        path = path.parent
    return path


def check_on_disk(path: str | os.PathLike) -> Path:
    """`nearest_directory(path)`, or raise unless it is on a file system that keeps its files on a disk."""
    directory = nearest_directory(path)
    kind = filesystem_type(directory)
    if kind in MEMORY_FILESYSTEMS:
        raise ValueError(f"{directory} is on {kind}, which keeps its files in memory: a disk-backed buffer there "
                         "would stay resident; give a directory on a disk")
    return directory


def disk_buffer(numel: int, dtype: torch.dtype, near: str | os.PathLike) -> torch.Tensor:
    """A zeroed CPU tensor of `numel` elements whose pages belong to a file, not to anonymous memory.

    The file goes into `nearest_directory(near)` (so `near` may be an output directory not created yet), is
    reserved in full (a full disk fails here, not later as SIGBUS) and unlinked at once: nothing is left there,
    even after a crash. The pages count in RssFile; once written back the kernel may drop them under memory
    pressure and read them again when touched, where anonymous memory would need swap. Meant for buffers that
    are written once and then only read (the base and task vectors of an adaptive run). A file system that keeps
    files in memory (tmpfs) is refused: the buffer would stay resident.
    """
    directory = check_on_disk(near)
    if numel == 0:
        return torch.empty(0, dtype=dtype)
    nbytes = numel * dtype.itemsize
    free = shutil.disk_usage(directory).free
    if free < nbytes:
        raise OSError(f"{directory}: a disk-backed buffer needs {nbytes:,} bytes, {free:,} are free")
    fd, name = tempfile.mkstemp(dir=directory, prefix=".pyfuse-buffer-")
    try:
        os.posix_fallocate(fd, 0, nbytes)
        return torch.from_file(name, shared=True, size=numel, dtype=dtype)
    finally:
        os.close(fd)
        os.unlink(name)


def is_disk_backed(tensor: torch.Tensor) -> bool:
    """Whether `tensor`'s storage is a file mapping (`disk_buffer`, `torch.from_file`)."""
    return tensor.device.type == "cpu" and tensor.untyped_storage().filename is not None
