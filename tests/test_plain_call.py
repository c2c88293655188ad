"""The public linear functions' plain case (bigmodel.ops.linear_relu.plain_call, one C++ call that
checks, flattens and calls the registered op: csrc/python_call.cpp): it is taken where it
should be, gives exactly what the op gives, and leaves every other case to the Python path."""
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import bigmodel
from bigmodel.ops import _registry
from bigmodel.ops.linear_relu import plain_call

# The modules (bigmodel.ops' attributes of these names are the functions).
linear_relu_module = sys.modules["bigmodel.ops.linear_relu"]
fused_linear_module = sys.modules["bigmodel.ops.fused_linear"]

pytestmark = pytest.mark.skipif(not _registry.has_ops(), reason="needs the C++ extension")

# The op's activation names, with what the public function is called with for each.
ACTIVATIONS = {"relu": ("relu", "none"), "none": (None, "none"),
               "leaky_relu": ("leaky_relu", "none"),
               "gelu": ("gelu", "none"), "gelu_tanh": ("gelu", "tanh"), "silu": ("silu", "none"),
               "tanh": ("tanh", "none"), "sigmoid": ("sigmoid", "none")}


def _op(x, w, b, name, slope=0.2):
    """The registered op on 2-D x, as the Python path calls it."""
    if name == "relu":
        return torch.ops.bigmodel.linear_relu.default(x, w, b)
    return torch.ops.bigmodel.fused_linear.default(x, w, b, name, slope, False)[0]


def _public(x, w, b, name, slope=0.2):
    activation, approximate = ACTIVATIONS[name]
    return bigmodel.fused_linear(x, w, b, activation, negative_slope=slope, approximate=approximate)


@pytest.fixture
def python_path_raises(monkeypatch):
    """The Python path's checks raise: a call that reaches them did not take the plain case."""
    def refuse(*args, **kwargs):
        raise AssertionError("the plain case was not taken")

    monkeypatch.setattr(linear_relu_module, "_check", refuse)
    monkeypatch.setattr(fused_linear_module, "_check", refuse)


@pytest.mark.parametrize("name", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_plain_case_is_one_call_and_exactly_the_op(name, dtype, python_path_raises):
    w = torch.nn.Parameter(torch.randn(7, 13, dtype=dtype))
    b = torch.randn(7, dtype=dtype)
    x3 = torch.randn(2, 5, 13, dtype=dtype)
    cases = {
        "2-D": (torch.randn(9, 13, dtype=dtype), b),
        "3-D": (x3, b),
        "1-D": (torch.randn(13, dtype=dtype), b),
        "no bias": (torch.randn(9, 13, dtype=dtype), None),
        "transposed": (torch.randn(13, 9, dtype=dtype).t(), b),
        "3-D strided": (x3.transpose(0, 1), b),
        "empty batch": (torch.randn(0, 13, dtype=dtype), b),
    }
    for what, (x, bias) in cases.items():
        y = _public(x, w, bias, name)
        flat = x.reshape(-1, 13) if x.dim() != 2 else x
        expected = _op(flat, w, bias, name).reshape(*x.shape[:-1], 7)
        assert y.shape == (*x.shape[:-1], 7), what
        assert torch.equal(y, expected), f"{name} {what}"
    if name == "relu":
        expected = _op(x3.reshape(-1, 13), w, b, "relu").reshape(2, 5, 7)
        assert torch.equal(bigmodel.linear_relu(x3, w, b), expected)


def test_plain_case_records_autograd_where_eager_would(python_path_raises):
    x = torch.randn(2, 6, 5, requires_grad=True)
    w = torch.randn(4, 5, requires_grad=True)
    b = torch.randn(4, requires_grad=True)
    for name in ("relu", "gelu", "tanh"):
        y = _public(x, w, b, name)
        ref = {"relu": F.relu, "gelu": F.gelu, "tanh": torch.tanh}[name](F.linear(x, w, b))
        assert y.grad_fn is not None
        grads = torch.autograd.grad(y, (x, w, b), torch.ones_like(y))
        ref_grads = torch.autograd.grad(ref, (x, w, b), torch.ones_like(ref))
        for got, want in zip(grads, ref_grads):
            torch.testing.assert_close(got, want)
        with torch.no_grad():
            assert _public(x, w, b, name).grad_fn is None
        assert _public(x.detach(), w.detach(), b.detach(), name).requires_grad is False


class _Tagged(torch.Tensor):
    """A subclass with its own __torch_function__ (which the plain case must not bypass)."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return super().__torch_function__(func, types, args, kwargs or {})


class _CountingMode(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


def test_everything_else_is_left_to_the_python_path():
    x, w, b = torch.randn(3, 5), torch.randn(4, 5), torch.randn(4)
    assert plain_call(x, w, b, "relu") is not None
    assert plain_call(x, w, None, "gelu") is not None
    others = {
        "subclass input": (x.as_subclass(_Tagged), w, b),
        "subclass weight": (x, w.as_subclass(_Tagged), b),
        "subclass bias": (x, w, b.as_subclass(_Tagged)),
        "mixed dtypes": (x, w.double(), b),
        "bias dtype": (x, w, b.double()),
        "integer": (x.long(), w.long(), b.long()),
        "in_features": (x, torch.randn(4, 6), b),
        "weight 3-D": (x, w[None], b),
        "bias size": (x, w, torch.randn(5)),
        "bias 2-D": (x, w, b[None]),
        "0-d input": (torch.tensor(1.0), w, b),
        "meta": (x.to("meta"), w.to("meta"), b.to("meta")),
        "not tensors": (x.tolist(), w, b),
    }
    for what, args in others.items():
        assert plain_call(*args, "relu") is None, what
    with _CountingMode() as mode:
        assert plain_call(x, w, b, "relu") is None
        y = bigmodel.linear_relu(x, w, b)  # the Python path honours the mode
    assert mode.calls > 0
    assert torch.equal(y, torch.ops.bigmodel.linear_relu.default(x, w, b))
    with bigmodel.use_backend("cpp"):  # the plain case on CPU tensors, the Python path else
        assert plain_call(x, w, b, "relu") is not None
        assert plain_call(x.to("meta"), w.to("meta"), b.to("meta"), "relu") is None
    for name in ("triton", "reference", "cublaslt"):  # none of them on CPU tensors
        with bigmodel.use_backend(name):
            assert plain_call(x, w, b, "relu") is None


def test_errors_are_the_python_paths():
    x, w = torch.randn(3, 5), torch.randn(4, 5)
    with pytest.raises(ValueError, match="in_features"):
        bigmodel.linear_relu(x, torch.randn(4, 6))
    with pytest.raises(TypeError, match="dtype"):
        bigmodel.fused_linear(x, w.double(), activation="gelu")
    with pytest.raises(TypeError, match="floating point"):
        bigmodel.linear_relu(x.long(), w.long())
