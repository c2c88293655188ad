"""bigmodel: fused kernels for the building blocks of large models.

  linear_relu(input, weight, bias=None)            relu(F.linear(...)) in one kernel
  fused_linear(input, weight, bias, activation)    act(F.linear(...)) for relu, leaky_relu, gelu,
                                                  silu, tanh, sigmoid or None, in one kernel
  scaled_dot_product_attention(q, k, v, ...)      torch's SDPA contract, FlashAttention-style
  nn.FusedLinear, nn.FusedLinearReLU,
  nn.MultiheadAttention                           drop-in modules
  optimize(model)                                 swap and fuse a model's layers
  use_backend(name)                               'auto' | 'cpp' | 'triton' | 'cublaslt' | 'reference'
"""
from bigmodel import integrations, nn  # noqa: F401
from bigmodel.backend import use_backend  # noqa: F401
from bigmodel.ops.attention import scaled_dot_product_attention  # noqa: F401
from bigmodel.ops.fused_linear import fused_linear  # noqa: F401
from bigmodel.ops.linear_relu import linear_relu  # noqa: F401
from bigmodel.optimize import optimize  # noqa: F401

__version__ = "0.1.0"
