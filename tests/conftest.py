"""Environment the suite needs before anything imports triton or torch.

Triton kernels run on the CPU through Triton's interpreter, which must be chosen before triton is imported.
OpenMP threads that wait passively (instead of spinning) keep a shared or loaded machine from losing most
of its time to idle spinning; the policy is read when torch loads its OpenMP runtime.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


import shutil  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture
def disk_path(tmp_path):
    """A temporary directory on a disk, for disk-backed buffers (which refuse tmpfs): `tmp_path`, or where that
    is in memory, a directory inside the checkout; skipped where neither is on a disk."""
    from pyfuse.memory import MEMORY_FILESYSTEMS, filesystem_type

    if filesystem_type(tmp_path) not in MEMORY_FILESYSTEMS:
        yield tmp_path
        return
    root = Path(__file__).resolve().parent.parent
    if filesystem_type(root) in MEMORY_FILESYSTEMS:
        pytest.skip(f"no disk for disk-backed buffers: {tmp_path} and {root} are in memory")
    path = Path(tempfile.mkdtemp(dir=root, prefix=".test-disk-"))
    try:
        yield path
    finally:
        shutil.rmtree(path)
