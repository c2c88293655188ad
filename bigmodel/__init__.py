"""bigmodel: fused kernels for the building blocks of large models.

  linear_relu(input, weight, bias=None)            relu(F.linear(...)) in one kernel
  scaled_dot_product_attention(q, k, v, ...)      torch's SDPA contract, FlashAttention-style
  nn.FusedLinearReLU, nn.MultiheadAttention        drop-in modules
  optimize(model)                                 swap and fuse a model's layers
  use_backend(name)                               'auto' | 'cpp' | 'triton' | 'cublaslt' | 'reference'
"""
from bigmodel import integrations, nn  # noqa: F401
from bigmodel.backend import use_backend  # noqa: F401
from bigmodel.ops.attention import scaled_dot_product_attention  # noqa: F401
from bigmodel.ops.linear_relu import linear_relu  # noqa: F401
from bigmodel.optimize import optimize  # noqa: F401

__version__ = "0.1.0"
