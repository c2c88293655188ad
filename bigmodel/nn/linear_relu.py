"""FusedLinearReLU: nn.Linear followed by ReLU, as one fused op."""
import torch

from bigmodel.ops.linear_relu import linear_relu


class FusedLinearReLU(torch.nn.Linear):
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

    def forward(self, input):
        return linear_relu(input, self.weight, self.bias)

    @classmethod
    def from_linear(cls, linear):
        """A FusedLinearReLU sharing ``linear``'s parameters (no copy)."""
        fused = cls.__new__(cls)
        torch.nn.Module.__init__(fused)
        fused.in_features, fused.out_features = linear.in_features, linear.out_features
        fused.weight = linear.weight
        fused.bias = linear.bias
        return fused
