"""The kernel paths CI runs, and how a test enters one. Every path but 'reference' is the
registered op (torch.ops.bigmodel.*), reached through the public functions:

  cpp        the C++ engine (csrc/cpu/), the op's CPU kernel from bigmodel._C;
  triton     the Triton kernels, the op's CUDA kernel, registered for CPU tensors for the
             duration of the test by bigmodel.ops.triton_kernels_on_cpu() and run by the Triton
             interpreter (tests/conftest.py sets TRITON_INTERPRET=1 where there is no GPU);
  reference  plain PyTorch (bigmodel/reference.py), no op.

The interpreter runs fp32 and fp16 only (its bf16 computes on raw bit patterns; it has no fp64
dot), at ~2.5 ms per 64-wide inner step: Triton gets small shapes.
"""
import contextlib
import functools

import torch

import bigmodel
from bigmodel.ops import triton_kernels_on_cpu

CPP_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
TRITON_DTYPES = (torch.float32, torch.float16)
# (path, dtype) pairs for tests that run everywhere.
PATHS = [("cpp", d) for d in CPP_DTYPES] + [("triton", d) for d in TRITON_DTYPES]


@contextlib.contextmanager
def on(path):
    """Run the block's bigmodel calls on ``path`` ('cpp', 'triton' or 'reference')."""
    if path == "triton":
        with triton_kernels_on_cpu(), bigmodel.use_backend("triton"):
            yield
    else:
        with bigmodel.use_backend(path):
            yield


@contextlib.contextmanager
def deterministic():
    """torch.use_deterministic_algorithms(True) for the block."""
    old, old_warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(old, warn_only=old_warn)


@functools.lru_cache(maxsize=None)
def intel_cpu():
    """Whether the CPU is Intel's, where MKL runs its full-width code and the cpp path's GEMM plan
    never picks oneDNN (csrc/cpu/cpu_vec.h, mkl_runs_full_width)."""
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.split(":")[-1].strip() == "GenuineIntel" for line in f if line.startswith("vendor_id"))
    except OSError:
        return False
