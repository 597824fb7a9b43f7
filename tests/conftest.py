"""Triton kernels run on the CPU through Triton's interpreter, which must be chosen before triton is imported."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
