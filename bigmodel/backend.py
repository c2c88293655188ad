"""Which implementation runs where, and the override.

Backends:
  ``auto``       CUDA tensors -> Triton kernels, CPU tensors -> the C++ engine (default).
  ``cpp``        the C++ engine (CPU tensors).
  ``triton``     the Triton kernels; on CPU tensors only under ``TRITON_INTERPRET=1``
                 (that is how CI runs them).
  ``reference``  plain PyTorch (bigmodel.reference), what the tests trust.
  ``cublaslt``   linear_relu only, CUDA tensors: cuBLASLt with the RELU_AUX_BIAS epilogue
                 (csrc/cuda/). Not what ``auto`` picks until it is measured on the H200.

Chosen by the ``BIGMODEL_BACKEND`` environment variable or the :func:`use_backend` context
manager. The override is process-wide, like torch.backends flags: a ``use_backend`` block in one
thread applies to calls made meanwhile from other threads too (the innermost block wins), and the
setting is restored when every block has exited.
"""
import contextlib
import os

import torch

BACKENDS = ("auto", "cpp", "triton", "reference", "cublaslt")

_stack = []  # overrides from use_backend(), innermost last


def _check_name(name, origin):
    if name not in BACKENDS:
        raise ValueError(f"{origin}: unknown backend {name!r}; expected one of {BACKENDS}")
    return name


def current():
    """The backend name in force: the innermost :func:`use_backend`, else BIGMODEL_BACKEND, else 'auto'."""
    if _stack:
        return _stack[-1]
    return _check_name(os.environ.get("BIGMODEL_BACKEND", "auto").strip().lower() or "auto",
                       "BIGMODEL_BACKEND")


@contextlib.contextmanager
def use_backend(name):
    """Run bigmodel ops with backend ``name`` ('auto', 'cpp', 'triton' or 'reference') inside the block.

    Example::

        >>> with bigmodel.use_backend("reference"):
        ...     y = bigmodel.linear_relu(x, w, b)
    """
    _stack.append(_check_name(name, "bigmodel.use_backend"))
    try:
        yield
    finally:
        _stack.pop()


def triton_interpreted():
    """True when Triton kernels run through the interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def default_for(device_type):
    """What ``auto`` means for tensors on ``device_type``."""
    return "triton" if device_type == "cuda" else "cpp"


def resolve(device, op, extra=()):
    """The concrete backend for an op on ``device`` under the current setting; raises if it can't run there.

    ``extra`` names the op-specific backends the op has (e.g. ``("cublaslt",)`` for linear_relu).
    """
    name = current()
    dtype = device.type
    if name == "auto":
        name = default_for(dtype)
    if name == "triton" and dtype != "cuda" and not (dtype == "cpu" and triton_interpreted()):
        raise RuntimeError(
            f"bigmodel.{op}: the 'triton' backend needs CUDA tensors, or TRITON_INTERPRET=1 set "
            f"before triton is imported to run its kernels on CPU tensors; got {dtype} tensors"
        )
    if name == "cpp" and dtype != "cpu":
        raise RuntimeError(f"bigmodel.{op}: the 'cpp' backend runs on CPU tensors; got {dtype} tensors")
    if name == "cublaslt" and (dtype != "cuda" or name not in extra):
        raise RuntimeError(f"bigmodel.{op}: the 'cublaslt' backend runs linear_relu on CUDA tensors; "
                           f"got {op} on {dtype} tensors")
    if name not in ("triton", "cpp", "reference", "cublaslt"):
        raise RuntimeError(f"bigmodel.{op}: no backend for {dtype} tensors")
    return name
