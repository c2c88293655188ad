"""bigmodel::fused_linear: y = act(x W^T + b) for the seed's activations, its registration and its
public function.

The schema is in csrc/bigmodel.cpp, the CPU kernel in csrc/cpu/fused_linear.cpp and autograd in
csrc/autograd/fused_linear.cpp; this file adds the fake (meta) kernels, autocast, the CUDA kernel
(Triton, kernels/linear_relu.py's activation epilogues; under the 'cublaslt' backend
cuBLASLt's GELU_AUX_BIAS / BIAS epilogues for 'gelu_tanh' and 'none') and :func:`fused_linear`, which maps
F.linear's contract onto the 2-D op. ReLU goes to bigmodel::linear_relu, the same family with a
schema of its own (kept for its name and its smaller saved state).

The op returns (out, pre): ``pre`` is the pre-activation z = x W^T + b where the activation's
derivative needs it (GELU, SiLU, LeakyReLU with a negative slope), else an empty tensor and the
backward works from ``out`` (ReLU, LeakyReLU, Tanh, Sigmoid, none). Either way the op saves what
eager PyTorch saves for the same layer (F.gelu and F.silu save z, tanh and sigmoid their output).
"""
import math

import torch

from bigmodel import backend
from bigmodel.kernels._common import saves_pre_activation
from bigmodel.ops import _registry
from bigmodel.ops.linear_relu import _check, linear_relu, plain_call
from bigmodel.reference import ref_fused_linear

_WHERE = "bigmodel.fused_linear"
ACTIVATIONS = (None, "relu", "leaky_relu", "gelu", "silu", "tanh", "sigmoid")
# The op's activation names: gelu's approximation is part of the name.
_OP_NAMES = {None: "none", "leaky_relu": "leaky_relu", "silu": "silu", "tanh": "tanh", "sigmoid": "sigmoid"}
# The op's activations the 'cublaslt' backend runs (csrc/cuda/fused_linear_cublaslt.cu: the
# GELU_AUX_BIAS and BIAS epilogues; ReLU is bigmodel::linear_relu's RELU_AUX_BIAS).
CUBLASLT_ACTIVATIONS = ("none", "gelu_tanh")


def _triton():
    # Imported on first use: importing bigmodel must not need triton (CPU-only installs).
    from bigmodel.kernels import linear_relu as kernels

    return kernels


def op_activation(activation, approximate="none"):
    """The op's name for an activation: 'none', 'leaky_relu', 'gelu', 'gelu_tanh', 'silu', 'tanh',
    'sigmoid' (relu runs as bigmodel::linear_relu); raises for anything else."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"{_WHERE}: activation must be one of {ACTIVATIONS}, got {activation!r}")
    if activation == "gelu":
        if approximate not in ("none", "tanh"):
            raise ValueError(f"{_WHERE}: approximate must be 'none' or 'tanh' (as F.gelu), got {approximate!r}")
        return "gelu" if approximate == "none" else "gelu_tanh"
    return _OP_NAMES.get(activation, activation)


def fused_linear(input, weight, bias=None, activation="relu", negative_slope=0.01, approximate="none"):
    r"""fused_linear(input, weight, bias=None, activation="relu", negative_slope=0.01, approximate="none") -> Tensor

    Computes ``act(F.linear(input, weight, bias))`` in one fused kernel: the activation runs on
    the GEMM's fp32 accumulator before the single store, and its derivative is applied to the
    gradient as the backward GEMMs read it.

    Args:
        input (Tensor): ``(*, in_features)``, any number of leading dimensions (1-D too), any strides.
        weight (Tensor): ``(out_features, in_features)``.
        bias (Tensor, optional): ``(out_features,)``.
        activation (str or None): ``"relu"``, ``"leaky_relu"``, ``"gelu"``, ``"silu"``,
            ``"tanh"``, ``"sigmoid"``, or ``None`` for a plain linear through the same engine.
        negative_slope (float): LeakyReLU's slope for negative inputs (as ``F.leaky_relu``).
        approximate (str): GELU's ``"none"`` (erf) or ``"tanh"`` (as ``F.gelu``).

    Returns:
        Tensor of shape ``(*, out_features)``, with torch's semantics for each activation: NaN in
        an input row gives NaN in that output row; infinities as torch's functions give them.

    Runs on the backend in force (see :func:`bigmodel.use_backend`), with autograd, autocast and
    ``torch.compile``, in float32, float16, bfloat16 (and float64 on CPU).
    """
    name = op_activation(activation, approximate)
    if isinstance(negative_slope, bool) or not isinstance(negative_slope, (int, float)):
        raise TypeError(f"{_WHERE}: negative_slope must be a float, got {type(negative_slope).__name__}")
    if name == "relu":
        return linear_relu(input, weight, bias)
    out = plain_call(input, weight, bias, name, float(negative_slope))
    if out is not None:
        return out
    _check(input, weight, bias, _WHERE)
    flat = input.dim() == 2
    # M spelled out: reshape(-1, 0) is ambiguous. 2-D input as it is (a reshape costs ~4 us).
    x = input if flat else input.reshape(math.prod(input.shape[:-1]), input.shape[-1])
    if backend.resolve(x, _WHERE, _registry.triton_on_cpu(), cublaslt=name in CUBLASLT_ACTIVATIONS) == "reference":
        out = ref_fused_linear(x, weight, bias, activation, negative_slope, approximate)
    else:
        _registry.require_ops()
        # keep_pre=False: the pre-activation (GELU's and SiLU's backward reads it) only where
        # autograd records the call; in inference the epilogue runs in place, one output written.
        out = torch.ops.bigmodel.fused_linear.default(x, weight, bias, name, float(negative_slope), False)[0]
    return out if flat else out.reshape(*input.shape[:-1], weight.shape[0])


# ---------------------------------------------------------------------------------------------
# Registration of the op defined in csrc/bigmodel.cpp (only when the extension loaded).


def _fake_forward(input, weight, bias, activation, negative_slope, keep_pre=True):
    out = input.new_empty(input.shape[0], weight.shape[0])
    pre = input.new_empty(input.shape[0], weight.shape[0]) \
        if keep_pre and saves_pre_activation(activation, negative_slope) else input.new_empty(0)
    return out, pre


def _fake_backward(grad_output, output, pre, input, weight, activation, negative_slope, output_mask):
    def grad_like(t, needed):
        return torch.empty_like(t, memory_format=torch.contiguous_format) if needed else t.new_empty(0)

    return (grad_like(input, output_mask[0]), grad_like(weight, output_mask[1]),
            output.new_empty(weight.shape[0]) if output_mask[2] else output.new_empty(0))


def _cuda_forward(input, weight, bias, activation, negative_slope, keep_pre=True):
    if backend.current() == "cublaslt":  # raises for an activation cuBLASLt has no epilogue for
        out, pre = _registry._C.cublaslt_fused_linear(input, weight, bias, activation)
        # Its GELU_AUX_BIAS epilogue writes the aux output in the same pass; dropped, not kept.
        return out, pre if keep_pre else pre.new_empty(0)
    return _triton().fused_linear_fwd(input, weight, bias, activation, negative_slope, keep_pre)


def _cuda_backward(grad_output, output, pre, input, weight, activation, negative_slope, output_mask):
    if backend.current() == "cublaslt":
        return tuple(_registry._C.cublaslt_fused_linear_backward(grad_output, pre, input, weight, activation,
                                                                 list(output_mask)))
    return _triton().fused_linear_bwd(grad_output, output, pre, input, weight, activation, negative_slope,
                                      list(output_mask))


if _registry.has_ops():
    torch.library.register_fake("bigmodel::fused_linear", _fake_forward)
    torch.library.register_fake("bigmodel::fused_linear_backward", _fake_backward)
    # Autograd is registered in C++ (csrc/autograd/fused_linear.cpp), as for every op.
    _registry.register_cuda_kernel("fused_linear", _cuda_forward)
    _registry.register_cuda_kernel("fused_linear_backward", _cuda_backward)
    _registry.register_autocast("fused_linear")
