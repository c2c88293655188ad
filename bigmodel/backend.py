"""Which implementation runs where, and the override.

Every backend but ``reference`` is the registered op (``torch.ops.bigmodel.*``): the torch
dispatcher picks its kernel by the tensors' device. The names say which kernel you expect, and a
call whose tensors would reach another kernel is an error rather than a silent substitute.

Backends:
  ``auto``       the registered op: the C++ engine for CPU tensors, Triton for CUDA tensors (default).
  ``cpp``        the registered op on CPU tensors (the C++ engine, csrc/cpu/).
  ``triton``     the registered op on CUDA tensors (the Triton kernels, bigmodel.kernels); on CPU
                 tensors only while :func:`bigmodel.ops.triton_kernels_on_cpu` has registered
                 them for the CPU under ``TRITON_INTERPRET=1`` (how CI runs them).
  ``cublaslt``   CUDA tensors, the linear ops cuBLASLt has an epilogue for: linear_relu
                 (RELU_AUX_BIAS), fused_linear with activation None (BIAS) or GELU with
                 approximate='tanh' (GELU_AUX_BIAS); the registered op's CUDA kernel runs cuBLASLt
                 (csrc/cuda/) instead of Triton. Not what ``auto`` picks until it is measured on
                 the H200.
  ``reference``  plain PyTorch (bigmodel.reference), what the tests trust; no registered op.

Chosen by the ``BIGMODEL_BACKEND`` environment variable or the :func:`use_backend` context
manager. The override is a :class:`contextvars.ContextVar`: a ``use_backend`` block applies to
its own thread (or asyncio task) only, so concurrent blocks cannot restore each other's choice.
"""
import contextlib
import contextvars
import os

BACKENDS = ("auto", "cpp", "triton", "reference", "cublaslt")

_override = contextvars.ContextVar("bigmodel_backend", default=None)


def _check_name(name, origin):
    if name not in BACKENDS:
        raise ValueError(f"{origin}: unknown backend {name!r}; expected one of {BACKENDS}")
    return name


# os.environ's own mapping of encoded keys, read directly: os.environ.get of an unset variable
# raises and catches a KeyError inside (~0.4 us), and current() runs on every call of every op.
# os.environ keeps that mapping in step with its assignments (monkeypatch.setenv included).
try:
    _ENV_DATA, _ENV_KEY, _ENV_DECODE = os.environ._data, os.environ.encodekey("BIGMODEL_BACKEND"), \
        os.environ.decodevalue
except AttributeError:  # another Python's os.environ: the public way
    _ENV_DATA = None


def _env_backend():
    """BIGMODEL_BACKEND's value, or None when unset."""
    if _ENV_DATA is None:
        return os.environ.get("BIGMODEL_BACKEND")
    raw = _ENV_DATA.get(_ENV_KEY)
    return None if raw is None else _ENV_DECODE(raw)


def current():
    """The backend name in force: the innermost :func:`use_backend` of this thread or task, else
    ``BIGMODEL_BACKEND``, else ``'auto'``."""
    name = _override.get()
    if name is not None:
        return name
    raw = _env_backend()
    if raw is None:  # the usual case, without the parsing (every call asks)
        return "auto"
    return _check_name(raw.strip().lower() or "auto", "BIGMODEL_BACKEND")


class use_backend(contextlib.ContextDecorator):
    """Run bigmodel ops with backend ``name`` inside the block (this thread or asyncio task only).

    ``name`` is one of ``'auto'``, ``'cpp'``, ``'triton'``, ``'cublaslt'``, ``'reference'``; an
    unknown name raises ValueError at once. Blocks nest (the innermost wins), and the object
    also decorates a function (each call runs under the backend).

    Example::

        >>> with bigmodel.use_backend("reference"):
        ...     y = bigmodel.linear_relu(x, w, b)
    """

    # A class, not a @contextmanager generator: entered around every call of a small layer (the
    # bench does), the generator's frame cost ~12 us a call at 1024x256->10 against ~1 us here.

    def __init__(self, name):
        self._name = _check_name(name, "bigmodel.use_backend")
        self._tokens = []  # one per open block of this object (re-entered: nested)

    def __enter__(self):
        self._tokens.append(_override.set(self._name))
        return self

    def __exit__(self, *exc):
        _override.reset(self._tokens.pop())
        return False

    def _recreate_cm(self):
        # As a decorator, a fresh block per call: concurrent calls of the function in several
        # threads must not share one token list.
        return use_backend(self._name)

    def __repr__(self):
        return f"bigmodel.use_backend({self._name!r})"


def triton_interpreted():
    """True when Triton kernels run through the interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve(tensor, where, triton_on_cpu=False, cublaslt=False):
    """``'reference'`` or ``'op'`` for a call on ``tensor``'s device; raises if the backend in
    force cannot run there.

    ``where`` names the public function in errors; ``triton_on_cpu`` says whether the Triton
    kernels are registered for CPU tensors now; ``cublaslt`` whether the call has that backend
    (its op, and for fused_linear its activation).
    """
    name = current()
    # The usual case first, from is_cpu / is_cuda: ``device.type`` costs ~0.3 us a call.
    if name == "auto" and (tensor.is_cpu or tensor.is_cuda):
        return "op"
    kind = tensor.device.type
    if name == "reference":
        return "reference"
    if name == "cpp" and (kind != "cpu" or triton_on_cpu):
        got = f"{kind} tensors" if kind != "cpu" else "cpu tensors while the Triton kernels are registered for the CPU"
        raise RuntimeError(f"{where}: the 'cpp' backend runs on CPU tensors; got {got}")
    if name == "triton" and kind != "cuda" and not (kind == "cpu" and triton_on_cpu):
        raise RuntimeError(
            f"{where}: the 'triton' backend needs CUDA tensors, or CPU tensors inside "
            f"bigmodel.ops.triton_kernels_on_cpu() with TRITON_INTERPRET=1 set before triton is "
            f"imported; got {kind} tensors"
        )
    if name == "cublaslt" and not cublaslt:
        raise RuntimeError(f"{where}: the 'cublaslt' backend runs bigmodel.linear_relu, and "
                           f"bigmodel.fused_linear with activation None, 'relu' or 'gelu' "
                           f"(approximate='tanh'), only")
    if name == "cublaslt" and kind != "cuda":
        raise RuntimeError(f"{where}: the 'cublaslt' backend runs on CUDA tensors; got {kind} tensors")
    if kind not in ("cpu", "cuda"):
        raise RuntimeError(f"{where}: no backend for {kind} tensors")
    return "op"
