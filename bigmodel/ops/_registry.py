"""Loading the C++ extension, and the registration helpers every op uses.

The op schemas live in csrc/bigmodel.cpp; importing ``bigmodel._C`` defines them, registers the
CPU engine (csrc/cpu/) and the autograd of every op (csrc/autograd/). Each ops/<op>.py adds its
fake kernel, its CUDA kernel (the Triton launchers) and autocast through the helpers below.
Without the extension ``import bigmodel`` still works; every backend but ``reference`` then
raises :class:`ExtensionNotBuilt`, which says how to build.
"""
import contextlib

import torch

try:
    from bigmodel import _C  # noqa: F401  (defines torch.ops.bigmodel.*)

    C_ERROR = None
except ImportError as err:  # not built, or built against another torch
    _C = None
    C_ERROR = err

LIB = torch.library.Library("bigmodel", "FRAGMENT") if _C is not None else None

BUILD_HINT = (
    "bigmodel's C++ extension (bigmodel._C) is not built or failed to load ({err}). Build it "
    "with `make build` or `pip install -e . --no-build-isolation` from the source tree, or use "
    "the 'reference' backend."
)


class ExtensionNotBuilt(RuntimeError):
    """Raised when an op is called and bigmodel._C (which defines the ops) is not available."""


def has_ops():
    """Whether the registered ops (torch.ops.bigmodel.*) exist."""
    return _C is not None


def require_ops():
    if _C is None:
        raise ExtensionNotBuilt(BUILD_HINT.format(err=C_ERROR))


def register_autocast(name):
    """Autocast for ``bigmodel::<name>``, the one place it is done: floating inputs on the autocast
    device are cast to the autocast dtype in force (torch.get_autocast_dtype), as F.linear and
    SDPA are."""
    op = getattr(torch.ops.bigmodel, name).default
    for device_type, key in (("cpu", "AutocastCPU"), ("cuda", "AutocastCUDA")):
        keyset = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))

        def kernel(_keyset, *args, _device_type=device_type, _exclude=keyset):
            dtype = torch.get_autocast_dtype(_device_type)

            def cast(a):
                if isinstance(a, torch.Tensor) and a.is_floating_point() and a.device.type == _device_type:
                    return a.to(dtype)
                return a

            with torch._C._ExcludeDispatchKeyGuard(_exclude):
                return op(*[cast(a) for a in args])

        LIB.impl(name, kernel, key, with_keyset=True)


def autocast_dtype(device):
    """The dtype the registered autocast kernel will cast floating inputs on ``device`` to, or None."""
    kind = device.type
    if kind in ("cpu", "cuda") and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return None


# op name -> its CUDA kernel (a Triton launcher), as registered; see triton_kernels_on_cpu.
_CUDA_KERNELS = {}
_triton_on_cpu = [0]  # how many triton_kernels_on_cpu blocks are open


def register_cuda_kernel(name, kernel):
    """Registers ``kernel`` (Python, Triton underneath) as the CUDA kernel of ``bigmodel::<name>``."""
    torch.library.register_kernel(f"bigmodel::{name}", "cuda", kernel)
    _CUDA_KERNELS[name] = kernel


def triton_on_cpu():
    """Whether the Triton kernels are registered for CPU tensors now."""
    return _triton_on_cpu[0] > 0


@contextlib.contextmanager
def triton_kernels_on_cpu():
    """Registers every op's CUDA kernels (the Triton launchers) for CPU tensors inside the block.

    With ``TRITON_INTERPRET=1`` set before triton is imported, Triton runs its kernels on CPU
    tensors through its interpreter; this makes the registered ops reach them there, so CI tests
    the very dispatch path that CUDA runs (autograd, autocast, fake kernels included). The C++
    engine's CPU kernels come back when the block exits. Process-wide (the dispatcher is): not
    for use while other threads run bigmodel ops on CPU.
    """
    require_ops()
    lib = torch.library.Library("bigmodel", "IMPL")
    try:
        for name, kernel in _CUDA_KERNELS.items():
            lib.impl(name, kernel, "CPU")
        _triton_on_cpu[0] += 1
        try:
            yield
        finally:
            _triton_on_cpu[0] -= 1
    finally:
        lib._destroy()
