"""Launchers and torch.library registration, one op per file."""
from bigmodel.ops._registry import ExtensionNotBuilt, triton_kernels_on_cpu  # noqa: F401
from bigmodel.ops.attention import scaled_dot_product_attention  # noqa: F401
from bigmodel.ops.linear_relu import linear_relu  # noqa: F401
from bigmodel.ops.fused_linear import fused_linear  # noqa: F401
