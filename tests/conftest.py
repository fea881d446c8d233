"""Test-wide setup: Triton kernels run under the interpreter on CPU tensors, and no hub is ever contacted.

TRITON_INTERPRET must be set before triton decorates any kernel, so it is set here, before test modules
import anything. The GPU compile checks run in subprocesses without it.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.pop("EFFKERN_BACKEND", None)  # tests choose backends explicitly
os.environ.pop("EFFKERN_CPU_ISA", None)
