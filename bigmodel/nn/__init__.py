"""Drop-in nn.Module replacements: same constructor, parameters and state_dict as torch's."""
from bigmodel.nn.fused_linear import FusedLinear, FusedLinearReLU  # noqa: F401
from bigmodel.nn.linear import Linear  # noqa: F401
from bigmodel.nn.multihead_attention import MultiheadAttention  # noqa: F401
