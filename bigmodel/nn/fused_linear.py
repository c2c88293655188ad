"""FusedLinear: nn.Linear followed by an activation, as one fused op; FusedLinearReLU its ReLU case."""
import torch

from bigmodel.ops.fused_linear import fused_linear, op_activation
from bigmodel.ops.linear_relu import linear_relu


class FusedLinear(torch.nn.Linear):
    r"""Applies :math:`y = \mathrm{act}(x A^T + b)` with one fused kernel (:func:`bigmodel.fused_linear`).

    Same parameters (``weight``, ``bias``), initialization and ``state_dict`` keys as
    :class:`torch.nn.Linear`, so a Linear's state_dict loads into it and back.

    Args:
        in_features: size of each input sample.
        out_features: size of each output sample.
        bias: if ``False``, the layer has no additive bias. Default: ``True``.
        activation: ``"relu"``, ``"leaky_relu"``, ``"gelu"``, ``"silu"``, ``"tanh"``,
            ``"sigmoid"`` or ``None``. Default: ``"gelu"``.
        negative_slope: LeakyReLU's slope (as ``nn.LeakyReLU``). Default: ``0.01``.
        approximate: GELU's ``"none"`` or ``"tanh"`` (as ``nn.GELU``). Default: ``"none"``.
        device, dtype: factory kwargs, as for :class:`torch.nn.Linear`.

    Shape:
        - Input: :math:`(*, H_{in})`; Output: :math:`(*, H_{out})`.
    """

    def __init__(self, in_features, out_features, bias=True, activation="gelu", negative_slope=0.01,
                 approximate="none", device=None, dtype=None):
        op_activation(activation, approximate)  # a clear error before any parameter is made
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.activation, self.negative_slope, self.approximate = activation, float(negative_slope), approximate

    def forward(self, input):
        return fused_linear(input, self.weight, self.bias, self.activation, self.negative_slope, self.approximate)

    def extra_repr(self):
        extra = f"activation={self.activation!r}"
        if self.activation == "leaky_relu":
            extra += f", negative_slope={self.negative_slope}"
        if self.activation == "gelu" and self.approximate != "none":
            extra += f", approximate={self.approximate!r}"
        return f"{super().extra_repr()}, {extra}"

    @classmethod
    def from_linear(cls, linear, activation="gelu", negative_slope=0.01, approximate="none"):
        """A fused layer sharing ``linear``'s parameters (no copy)."""
        op_activation(activation, approximate)
        fused = cls.__new__(cls)
        torch.nn.Module.__init__(fused)
        fused.in_features, fused.out_features = linear.in_features, linear.out_features
        fused.weight = linear.weight
        fused.bias = linear.bias
        fused.activation, fused.negative_slope, fused.approximate = activation, float(negative_slope), approximate
        fused.training = linear.training
        return fused


class FusedLinearReLU(FusedLinear):
    r"""Applies :math:`y = \mathrm{relu}(x A^T + b)` with one fused kernel.

    Same constructor, parameters (``weight``, ``bias``), initialization, ``state_dict`` keys and
    ``repr`` as :class:`torch.nn.Linear`, so a Linear's state_dict loads into it and back.

    Args:
        in_features: size of each input sample.
        out_features: size of each output sample.
        bias: if ``False``, the layer has no additive bias. Default: ``True``.
        device, dtype: factory kwargs, as for :class:`torch.nn.Linear`.

    Shape:
        - Input: :math:`(*, H_{in})`; Output: :math:`(*, H_{out})`.
    """

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None):
        super().__init__(in_features, out_features, bias, "relu", device=device, dtype=dtype)

    def forward(self, input):
        return linear_relu(input, self.weight, self.bias)

    def extra_repr(self):
        return torch.nn.Linear.extra_repr(self)

    @classmethod
    def from_linear(cls, linear):
        """A FusedLinearReLU sharing ``linear``'s parameters (no copy)."""
        return super().from_linear(linear, "relu")
