"""Loading the C++ extension, and registration helpers shared by the ops.

The op schemas live in csrc/bigmodel.cpp; importing ``bigmodel._C`` defines them and registers
the CPU engine. Without it, ``import bigmodel`` still works; the C++ paths then raise
:class:`ExtensionNotBuilt`, which says how to build.
"""
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
    "the 'triton' (CUDA) or 'reference' backend."
)


class ExtensionNotBuilt(RuntimeError):
    """Raised when an op needs bigmodel._C and it is not available."""


def has_ops():
    """Whether the registered ops (torch.ops.bigmodel.*) exist."""
    return _C is not None


def require_ops():
    if _C is None:
        raise ExtensionNotBuilt(BUILD_HINT.format(err=C_ERROR))


def register_autocast(name):
    """Autocast for ``bigmodel::<name>``: floating inputs on the autocast device are cast to the
    autocast dtype in force (torch.get_autocast_dtype), as F.linear and SDPA are."""
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


class KernelFunction(torch.autograd.Function):
    """Autograd around raw kernel launchers, for backends that are not the registered default
    on a device (the Triton kernels on CPU tensors under the interpreter, or any kernel when
    bigmodel._C is not built). ``kernels`` has ``forward(*inputs) -> (out, saved)`` and
    ``backward(saved, needs_input_grad, grad) -> grads``."""

    @staticmethod
    def forward(ctx, kernels, *inputs):
        out, saved = kernels.forward(*inputs)
        ctx.kernels, ctx.saved = kernels, saved
        return out

    @staticmethod
    def backward(ctx, grad):
        grads = ctx.kernels.backward(ctx.saved, ctx.needs_input_grad[1:], grad)
        return (None, *grads)
