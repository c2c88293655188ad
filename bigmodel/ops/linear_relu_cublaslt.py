"""bigmodel::linear_relu_cublaslt: the cuBLASLt backend of linear+ReLU, its registration and its
public function.

The schemas are in csrc/bigmodel.cpp and the CUDA kernels in csrc/cuda/linear_relu_cublaslt.cu
(one cublasLtMatmul with the RELU_AUX_BIAS epilogue forward, which also returns a 1-bit ReLU
mask; a masked-gradient pass and two GEMMs backward, the bias gradient reduced by the BGRADB
epilogue). This file adds the fake (meta) kernels, autograd and autocast, and
:func:`linear_relu_cublaslt` for 2-D inputs, which the backend selection calls.

Importing it is safe everywhere: without the extension nothing is registered, and without CUDA
the ops exist but have no kernel (:func:`available` says so).
"""
import torch

from bigmodel.ops import _registry
from bigmodel.ops.linear_relu import _check  # F.linear's errors, naming the shapes

_NAME = "linear_relu_cublaslt"
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def mask_bytes_per_row(out_features):
    """Bytes per row of the ReLU mask: cuBLASLt's leading dimension is a multiple of 128 bits."""
    return (out_features + 127) // 128 * 16


def _schema_exists():
    return _registry.has_ops() and hasattr(torch.ops.bigmodel, _NAME)


def available():
    """Whether the cuBLASLt kernels were compiled in (bigmodel._C built with CUDA) and registered."""
    return _schema_exists() and torch._C._dispatch_has_kernel_for_dispatch_key(
        f"bigmodel::{_NAME}", "CUDA"
    )


def supports(input, weight, bias=None):
    """Whether :func:`linear_relu_cublaslt` can take these tensors: 2-D CUDA input and weight of
    one float32/float16/bfloat16 dtype, and the kernels available. Shapes cuBLASLt has no
    algorithm for still raise NotImplementedError at the call."""
    tensors = [t for t in (input, weight, bias) if t is not None]
    return (
        input.dim() == 2
        and weight.dim() == 2
        and input.is_cuda
        and input.dtype in _DTYPES
        and all(t.device == input.device and t.dtype == input.dtype for t in tensors)
        and available()
    )


def linear_relu_cublaslt(input, weight, bias=None):
    r"""linear_relu_cublaslt(input, weight, bias=None) -> Tensor

    :math:`y = \mathrm{relu}(x W^T + b)` for a 2-D ``input`` on CUDA, computed by one cuBLASLt
    GEMM whose epilogue adds the bias, applies the ReLU and stores a 1-bit mask for the backward.
    Same contract as ``F.relu(F.linear(input, weight, bias))``: NaN in an input row gives NaN in
    that output row (cuBLASLt's own ReLU would give 0; the kernel repairs those entries).

    Args:
        input (Tensor): ``(M, in_features)``, float32 (TF32 when
            ``torch.backends.cuda.matmul.allow_tf32``), float16 or bfloat16, any strides.
        weight (Tensor): ``(out_features, in_features)``.
        bias (Tensor, optional): ``(out_features,)``.

    Returns:
        Tensor ``(M, out_features)``, contiguous.

    Raises:
        NotImplementedError: cuBLASLt has no algorithm for this shape/alignment (use another
            backend); ValueError/TypeError for mismatched shapes, dtypes or devices.
    """
    _check(input, weight, bias)
    if input.dim() != 2:
        raise ValueError(
            f"bigmodel.linear_relu_cublaslt: input must be 2-D (M, in_features), got shape {tuple(input.shape)}"
        )
    _registry.require_ops()
    out, _mask = torch.ops.bigmodel.linear_relu_cublaslt(input, weight, bias)
    return out


# ---------------------------------------------------------------------------------------------
# Registration of the ops defined in csrc/bigmodel.cpp (only when the extension loaded).


def _fake_forward(input, weight, bias):
    m, n = input.shape[0], weight.shape[0]
    out = input.new_empty(m, n)
    mask = input.new_empty(m, mask_bytes_per_row(n), dtype=torch.uint8)
    return out, mask


def _fake_backward(grad_output, relu_mask, input, weight, output_mask):
    # Shapes and strides as the CUDA kernel returns them: fresh contiguous tensors, empty ones
    # for gradients not asked for.
    m, k, n = input.shape[0], input.shape[1], weight.shape[0]
    dx = input.new_empty(m, k) if output_mask[0] else input.new_empty(0)
    dw = input.new_empty(n, k) if output_mask[1] else input.new_empty(0)
    db = input.new_empty(n) if output_mask[2] else input.new_empty(0)
    return dx, dw, db


def _setup_context(ctx, inputs, output):
    input, weight, bias = inputs
    _out, mask = output
    # The mask (M * out_features / 8 bytes) replaces the output that eager ReLU saves.
    ctx.save_for_backward(input, weight, mask)
    ctx.has_bias = bias is not None
    ctx.mark_non_differentiable(mask)


def _backward(ctx, grad, _grad_mask):
    input, weight, mask = ctx.saved_tensors
    need = ctx.needs_input_grad
    wanted = [need[0], need[1], ctx.has_bias and need[2]]
    dx, dw, db = torch.ops.bigmodel.linear_relu_cublaslt_backward(grad, mask, input, weight, wanted)
    return (dx if wanted[0] else None, dw if wanted[1] else None, db if wanted[2] else None)


if _schema_exists():
    torch.library.register_fake(f"bigmodel::{_NAME}", _fake_forward)
    torch.library.register_fake(f"bigmodel::{_NAME}_backward", _fake_backward)
    torch.library.register_autograd(f"bigmodel::{_NAME}", _backward, setup_context=_setup_context)
    _registry.register_autocast(_NAME)
