"""Launchers and torch.library registration, one op per file."""
from bigmodel.ops.attention import scaled_dot_product_attention  # noqa: F401
from bigmodel.ops.linear_relu import linear_relu  # noqa: F401
