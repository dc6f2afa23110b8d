"""Run Triton kernels in the interpreter (CI has no GPU); must be set before triton is imported."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
