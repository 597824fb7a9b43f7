"""Environment the suite needs before anything imports triton or torch.

Triton kernels run on the CPU through Triton's interpreter, which must be chosen before triton is imported.
OpenMP threads that wait passively (instead of spinning) keep a shared or loaded machine from losing most
of its time to idle spinning; the policy is read when torch loads its OpenMP runtime.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
