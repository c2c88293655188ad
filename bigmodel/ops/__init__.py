"""Launchers and torch.library registration, one op per file."""
from bigmodel.ops.attention import scaled_dot_product_attention  # noqa: F401
from bigmodel.ops.linear_relu import linear_relu  # noqa: F401
from bigmodel.ops import linear_relu_cublaslt  # noqa: F401,E402  (registers its fake/autograd)
