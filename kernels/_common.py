"""What every Triton launcher shares. Imports neither triton nor anything else heavy: the
bigmodel.ops modules read the dtype list from here on CPU-only installs without triton."""
import os

import torch

# The dtypes the Triton kernels take (fp16/bf16 on the tensor cores, fp32 as tf32 or FMAs).
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# The ops' dtypes on CPU: the C++ engine also runs float64 (gradcheck).
CPU_DTYPES = DTYPES + (torch.float64,)

# Read once, as triton itself does: TRITON_INTERPRET must be set before triton is imported.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

SMEM_LIMIT = 227 * 1024  # shared memory one CTA may use on the H200 (sm_90)

LOG2E = 1.4426950408889634  # kernels fold it into their scales: exp2 instead of exp


def dot_precision(dtype):
    """The ``input_precision`` of the kernels' dots: tf32 for fp32 only where torch allows it;
    fp16/bf16 always accumulate in fp32."""
    return "tf32" if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"


def saves_pre_activation(activation, negative_slope):
    """Whether the backward of a linear + ``activation`` (the op's name) reads the pre-activation
    z = x W^T + b rather than the output: the derivative is not a function of the output."""
    return activation in ("gelu", "gelu_tanh", "silu") or (activation == "leaky_relu" and negative_slope < 0)
