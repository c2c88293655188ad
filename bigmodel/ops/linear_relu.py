"""bigmodel::linear_relu: y = relu(x W^T + b), its registration and its public function.

The schema is in csrc/bigmodel.cpp, the CPU kernel in csrc/cpu/linear_relu.cpp and autograd in
csrc/autograd/linear_relu.cpp; this file adds the fake (meta) kernels, autocast and the CUDA
kernel (Triton, or cuBLASLt under the 'cublaslt' backend), and the public function that maps
F.linear's contract onto the 2-D op.
"""
import math

import torch

from bigmodel import backend
from bigmodel.kernels._common import CPU_DTYPES
from bigmodel.ops import _registry
from bigmodel.reference import ref_linear_relu

_NAME = "linear_relu"
_WHERE = "bigmodel.linear_relu"


def _triton():
    # Imported on first use: importing bigmodel must not need triton (CPU-only installs).
    from bigmodel.kernels import linear_relu as kernels

    return kernels


# dtypes each device's kernels take (other devices, e.g. meta: the CPU's).
_RUNS = {"cpu": frozenset(CPU_DTYPES), "cuda": frozenset(CPU_DTYPES) - {torch.float64}}


# The plain case (tensors of one dtype and device a kernel takes, no subclass or mode with
# __torch_function__, not under torch.compile's tracing) in one C++ call that checks, flattens
# and calls the op: ~2.5 us of a small layer's ~5 us here (csrc/python_call.cpp). It answers
# None for anything else, which takes the path below (and raises its errors).
_compiling = torch.compiler.is_compiling
# The device each backend's plain case is on ("" any): elsewhere backend.resolve decides.
_PLAIN_DEVICE = {"auto": "", "cpp": "cpu", "triton": "cuda"}


def plain_call(input, weight, bias, activation, negative_slope=0.0):
    """act(F.linear(input, weight, bias)) by the registered op where the arguments are the plain
    case, else None; ``activation`` is the op's name ('relu' for bigmodel::linear_relu)."""
    ext = _registry._C
    if ext is None or _compiling():
        return None
    device = _PLAIN_DEVICE.get(backend.current())
    if device is None or (device == "cpu" and _registry.triton_on_cpu()):
        return None
    return ext.linear_call(input, weight, bias, activation, negative_slope, device)


def _check(input, weight, bias, where=_WHERE):
    """The errors F.linear gives, naming the shapes; raises before any kernel runs."""
    # The common case in one expression (~1 us, against ~2.5 for the full walk below, a sizeable
    # part of a small layer's call): tensors of one dtype and device that a kernel takes.
    if isinstance(input, torch.Tensor) and isinstance(weight, torch.Tensor) and input.dim() >= 1:
        dtype, device, wshape = input.dtype, input.device, weight.shape
        # is_cpu / is_cuda rather than device.type: ~0.3 us a call less.
        runs = _RUNS["cpu"] if input.is_cpu else _RUNS["cuda"] if input.is_cuda else ()
        if (len(wshape) == 2 and input.shape[-1] == wshape[1] and weight.dtype == dtype
                and weight.device == device and dtype in runs
                and (bias is None or (isinstance(bias, torch.Tensor) and bias.dim() == 1
                                      and bias.shape[0] == wshape[0] and bias.dtype == dtype
                                      and bias.device == device))):
            return
    _check_each(input, weight, bias, where)


def _check_each(input, weight, bias, where):
    """_check one condition at a time, raising the first error (or passing: mixed dtypes under
    autocast, which the registered autocast kernel casts)."""
    for name, t in (("input", input), ("weight", weight), ("bias", bias)):
        if not isinstance(t, torch.Tensor) and not (name == "bias" and t is None):
            raise TypeError(f"{where}: {name} must be a Tensor, got {type(t).__name__}")
    if input.dim() < 1:
        raise ValueError(f"{where}: input must have at least 1 dimension, got a 0-d tensor")
    if weight.dim() != 2:
        raise ValueError(f"{where}: weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    if input.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"{where}: input's last dimension ({input.shape[-1]}) must equal weight's in_features "
            f"({weight.shape[1]}); got input {tuple(input.shape)} and weight {tuple(weight.shape)}"
        )
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        raise ValueError(
            f"{where}: bias must be 1-D of size out_features ({weight.shape[0]}), got shape {tuple(bias.shape)}"
        )
    # Under autocast the registered autocast kernel casts every floating input to one dtype.
    cast = _registry.autocast_dtype(input.device)
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if t.device != input.device:
            raise ValueError(f"{where}: {name} is on {t.device} but input is on {input.device}")
        if t.dtype != input.dtype and not (cast is not None and t.is_floating_point()):
            raise TypeError(f"{where}: {name} dtype {t.dtype} does not match input dtype {input.dtype}")
    if not input.is_floating_point():
        raise TypeError(f"{where}: expected a floating point input, got {input.dtype}")
    dtype = cast or input.dtype
    if dtype not in _RUNS.get(input.device.type, _RUNS["cpu"]):
        raise TypeError(f"{where}: dtype {dtype} is not supported on {input.device.type}")


def linear_relu(input, weight, bias=None):
    r"""linear_relu(input, weight, bias=None) -> Tensor

    Applies :math:`y = \mathrm{relu}(x W^T + b)` in one fused kernel: exactly
    ``F.relu(F.linear(input, weight, bias))``, with the output written once.

    Args:
        input (Tensor): ``(*, in_features)``, any number of leading dimensions (1-D too), any strides.
        weight (Tensor): ``(out_features, in_features)``.
        bias (Tensor, optional): ``(out_features,)``.

    Returns:
        Tensor of shape ``(*, out_features)``. NaN in an input row gives NaN in that output row.

    Runs on the backend in force (see :func:`bigmodel.use_backend`): the registered op
    ``torch.ops.bigmodel.linear_relu`` (the C++ engine for CPU tensors, Triton or cuBLASLt for
    CUDA tensors) or the plain-PyTorch reference. Supports float32, float16, bfloat16 (and
    float64 on CPU), autograd, autocast and ``torch.compile``.
    """
    out = plain_call(input, weight, bias, "relu")
    if out is not None:
        return out
    _check(input, weight, bias)
    flat = input.dim() == 2
    # (M, K) with M spelled out: reshape(-1, 0) is ambiguous for an empty K.
    # A view whenever the strides allow; 2-D input as it is (the reshape costs ~4 us a call).
    x = input if flat else input.reshape(math.prod(input.shape[:-1]), input.shape[-1])
    if backend.resolve(x, _WHERE, _registry.triton_on_cpu(), cublaslt=True) == "reference":
        out = ref_linear_relu(x, weight, bias)
    else:
        _registry.require_ops()
        out = torch.ops.bigmodel.linear_relu.default(x, weight, bias)
    # 2-D in, the op's own tensor out (not a view: FSDP2 and in-place users prefer that).
    return out if flat else out.reshape(*input.shape[:-1], weight.shape[0])


# ---------------------------------------------------------------------------------------------
# Registration of the op defined in csrc/bigmodel.cpp (only when the extension loaded).


def _fake_forward(input, weight, bias):
    return input.new_empty(input.shape[0], weight.shape[0])


def _fake_backward(grad_output, output, input, weight, output_mask):
    def grad_like(t, needed):
        return torch.empty_like(t, memory_format=torch.contiguous_format) if needed else t.new_empty(0)

    return (grad_like(input, output_mask[0]), grad_like(weight, output_mask[1]),
            output.new_empty(weight.shape[0]) if output_mask[2] else output.new_empty(0))


def _cuda_forward(input, weight, bias):
    if backend.current() == "cublaslt":
        return _registry._C.cublaslt_linear_relu(input, weight, bias)
    return _triton().linear_relu_fwd(input, weight, bias)


def _cuda_backward(grad_output, output, input, weight, output_mask):
    if backend.current() == "cublaslt":
        return _registry._C.cublaslt_linear_relu_backward(grad_output, output, input, weight, list(output_mask))
    return _triton().linear_relu_bwd(grad_output, output, input, weight, list(output_mask))


if _registry.has_ops():
    torch.library.register_fake("bigmodel::linear_relu", _fake_forward)
    torch.library.register_fake("bigmodel::linear_relu_backward", _fake_backward)
    # Autograd is registered in C++ (csrc/autograd/linear_relu.cpp): cheaper per call.
    _registry.register_cuda_kernel("linear_relu", _cuda_forward)
    _registry.register_cuda_kernel("linear_relu_backward", _cuda_backward)
    _registry.register_autocast(_NAME)
