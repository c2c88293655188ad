"""bigmodel.fused_linear, bigmodel::fused_linear and nn.FusedLinear for every activation, on every
path CI runs (tests/paths.py), against the float64 reference by the house rule
(tests/tolerances.py), with torch's eager act(F.linear) in the same dtype as the peer.
"""
import pytest
import torch
import torch.nn.functional as F

import bigmodel
from bigmodel.reference import ref_fused_linear
from error_table import check_row, rows_of
from paths import PATHS, on
from peers import assert_fused_linear_matches
from tolerances import FORWARD, assert_matches

# (activation, negative_slope, approximate): every activation, GELU both ways, LeakyReLU with a
# negative slope too (its backward then needs the pre-activation).
ACTIVATIONS = [(None, 0.01, "none"), ("relu", 0.01, "none"), ("leaky_relu", 0.01, "none"),
               ("leaky_relu", -0.3, "none"), ("gelu", 0.01, "none"), ("gelu", 0.01, "tanh"),
               ("silu", 0.01, "none"), ("tanh", 0.01, "none"), ("sigmoid", 0.01, "none")]
IDS = ["none", "relu", "leaky", "leaky-neg", "gelu", "gelu-tanh", "silu", "tanh", "sigmoid"]
SHAPES = {"cpp": [(1, 1, 1), (7, 13, 5), (113, 64, 33), (1023, 130, 71)],
          "triton": [(1, 7, 5), (33, 40, 17)]}


def _inputs(m, k, n, dtype, bias=True):
    x = (torch.randn(m, k) / max(k, 1)**0.25).to(dtype).requires_grad_()
    w = (torch.randn(n, k) / max(k, 1)**0.25).to(dtype).requires_grad_()
    b = torch.randn(n).to(dtype).requires_grad_() if bias else None
    return x, w, b


def _pre_activation(path, x, w, b, slope):
    """The z the op saved for LeakyReLU with a negative slope (its backward branches on z > 0),
    or None: the truth takes the same branch at |z| below the GEMM's rounding error."""
    if slope >= 0:
        return None
    x2 = x.detach().reshape(-1, x.shape[-1])
    bias = None if b is None else b.detach()
    if path == "reference":
        return torch.nn.functional.linear(x2, w.detach(), bias)
    with on(path):
        return torch.ops.bigmodel.fused_linear(x2, w.detach(), bias, "leaky_relu", slope)[1]


def _check(path, x, w, b, act, what=""):
    name, slope, approx = act
    with on(path):
        y = bigmodel.fused_linear(x, w, b, name, slope, approx)
        grad = torch.randn_like(y)
        leaves = {n: t for n, t in zip("xwb", (x, w, b)) if t is not None and t.requires_grad}
        grads = dict(zip(leaves, torch.autograd.grad(y, list(leaves.values()), grad)))
    pre = _pre_activation(path, x, w, b, slope) if name == "leaky_relu" else None
    if pre is not None:  # the branch's source is itself checked against float64
        x2, bias = x.detach().reshape(-1, x.shape[-1]), None if b is None else b.detach()
        z64 = F.linear(x2.double(), w.detach().double(), None if bias is None else bias.double())
        assert_matches(pre, F.linear(x2, w.detach(), bias), z64, FORWARD, f"{path} {what} pre")
    assert_fused_linear_matches(y, x, w, b, name, slope, approx, grad, grads, f"{path} {name} {what}", pre)
    return y


@pytest.mark.parametrize("act", ACTIVATIONS, ids=IDS)
@pytest.mark.parametrize("path,dtype", PATHS, ids=str)
def test_matches_float64_reference(path, dtype, act):
    for m, k, n in SHAPES[path]:
        for bias in (True, False):
            _check(path, *_inputs(m, k, n, dtype, bias), act, f"{(m, k, n)} bias={bias}")


def _float_ulps(y, ref):
    """|y - ref| in units of float32's spacing at |ref| (ref in float64)."""
    spacing = torch.nextafter(ref.abs().float(), torch.tensor(float("inf"))).double() - ref.abs().float().double()
    return (y.double() - ref).abs() / spacing


def test_cpp_tanh_matches_float64_within_2_ulp():
    """The engine's own float tanh (csrc/cpu/vec_math_kernel.h tanh_float; MKL's on Intel CPUs)
    over a dense sweep, through an identity weight (a GEMM that adds exact zeros): at most 2 ulp
    from float64's tanh everywhere (it measures 1.65; torch's, MKL's, 0.5). Both signs, tiny
    inputs, the branch point |x| = 1, saturation, and widths that are all vector tail."""
    gen = torch.Generator().manual_seed(11)
    k = 61
    magnitude = torch.cat([torch.logspace(-8, 1.4, 61 * 2000), torch.rand(61 * 4000, generator=gen) * 3,
                           1 + (torch.rand(61 * 500, generator=gen) - 0.5) * 1e-3])
    sign = torch.where(torch.rand(magnitude.numel(), generator=gen) < 0.5, -1.0, 1.0)
    x = (magnitude * sign).reshape(-1, k)
    with on("cpp"), torch.no_grad():
        y = bigmodel.fused_linear(x, torch.eye(k), None, "tanh")
        short = torch.randn(5, 7, generator=gen) * 2
        y_short = bigmodel.fused_linear(short, torch.eye(7), None, "tanh")
    for got, inp in ((y, x), (y_short, short)):
        ulps = _float_ulps(got, torch.tanh(inp.double()))
        worst = ulps.argmax()
        assert ulps.max() <= 2.0, f"{ulps.max():.2f} ulp at x = {inp.flatten()[worst].item()!r}"


@pytest.mark.parametrize("act", [pytest.param(a, id=i) for a, i in zip(ACTIVATIONS, IDS) if a != ("gelu", 0.01, "none")])
def test_cpp_deterministic_wherever_an_element_falls(act):
    """The epilogue's scalar tails compute what its vector lanes compute, bit for bit (the same
    operations in the same order, vec_math_kernel.h), forward and backward: a row of values
    repeated 17 times, so each value lands in lanes of every phase and, at the end, in the
    tail. (Before the scalar forms, sigmoid's tail was libm's exp and differed in the last bit.)
    Not exact GELU: its tails are libm's erf, as torch's own kernels' tails, since its lanes' A-S
    erf (1.5e-7) is off the house rule on outputs of a few elements."""
    name, slope, approx = act
    gen = torch.Generator().manual_seed(5)
    for n in (7, 23, 37):
        x = (torch.randn(n, generator=gen) * 3).repeat(17).reshape(-1, 1).requires_grad_()
        w = torch.ones(1, 1, requires_grad=True)
        with on("cpp"):
            y = bigmodel.fused_linear(x, w, None, name, slope, approx)
            dx, = torch.autograd.grad(y, x, torch.ones_like(y))
        for t in (y.detach(), dx):
            rows = t.reshape(17, n)
            assert torch.equal(rows, rows[:1].expand_as(rows)), (n, (rows != rows[0]).nonzero()[:3].tolist())


@pytest.mark.parametrize("act", ACTIVATIONS, ids=IDS)
def test_cpp_large_outputs_match_float64(act):
    """Outputs of 32 MB and more: whole tensors in the output cache's huge pages (MKL's call, then
    the epilogue over the output, in place or into y beside pre), forward and backward. K = 3
    keeps the GEMMs cheap; 8704 x 1024 fp32 is 34 MB. With K = 260, on AMD at AVX512, the
    engine's blocked path instead: each block's GEMMs are oneDNN's (the epilogue reading its
    block; pre copied out where the activation keeps it)."""
    _check("cpp", *_inputs(8704, 3, 1024, torch.float32, True), act, "whole 34 MB")
    _check("cpp", *_inputs(8200, 260, 1030, torch.float32, True), act, "oneDNN blocks or whole, 33 MB")


@pytest.mark.parametrize("act", ACTIVATIONS, ids=IDS)
@pytest.mark.parametrize("path", ["cpp", "triton", "reference"])
def test_nd_strided_and_empty_inputs(path, act):
    _, w, b = _inputs(1, 33, 17, torch.float32)
    for x in (torch.randn(2, 5, 33), torch.randn(33), torch.randn(33, 9).t(), torch.randn(9, 66)[:, ::2]):
        _check(path, x.requires_grad_(), w, b, act, f"x {tuple(x.shape)} strides {x.stride()}")
    _check(path, torch.randn(2, 5, 33, requires_grad=True), torch.randn(33, 17).t().requires_grad_(),
           torch.randn(34)[::2].requires_grad_(), act, "strided weight and bias")
    name, slope, approx = act
    with on(path):
        empty = bigmodel.fused_linear(torch.randn(0, 3, 33), w, b, name, slope, approx)
        no_k = bigmodel.fused_linear(torch.randn(4, 0), torch.randn(5, 0), b[:5].detach(), name, slope, approx)
    assert empty.shape == (0, 3, 17)
    torch.testing.assert_close(no_k, ref_fused_linear(torch.randn(4, 0), torch.randn(5, 0), b[:5].detach(),
                                                      name, slope, approx))


def _nan_and_inf_case(path, dtype, act, device="cpu"):
    """NaN in a row reaches exactly that row; +-inf pre-activations give what the float64
    reference gives."""
    name, slope, approx = act
    x, w = torch.randn(30, 16).to(dtype), torch.randn(12, 16).to(dtype)
    x[3, 5] = float("nan")
    x[4, 2], x[7, 1] = float("inf"), float("-inf")
    w[9, 2] = 0.0
    x, w = x.to(device), w.to(device)
    with on(path):
        y = bigmodel.fused_linear(x, w, None, name, slope, approx)
    ref = ref_fused_linear(x.double(), w.double(), None, name, slope, approx)
    assert torch.equal(y.isnan(), ref.isnan()), (y.isnan() ^ ref.isnan()).nonzero()[:5].tolist()
    assert torch.equal(y.isinf(), ref.isinf())
    finite = torch.isfinite(ref)
    assert torch.equal(y.double()[~finite & ~ref.isnan()], ref[~finite & ~ref.isnan()])
    assert torch.isnan(y[3]).all()


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, in the interpreter
@pytest.mark.parametrize("act", ACTIVATIONS, ids=IDS)
@pytest.mark.parametrize("path,dtype", PATHS, ids=str)
def test_nan_and_inf_as_torch(path, dtype, act):
    """As _nan_and_inf_case: tanh(inf) = 1, sigmoid(-inf) = 0, gelu(-inf) = NaN as -inf * 0.
    One difference from torch's own 16/32-bit kernels: GELU(+inf) is +inf, as torch gives it in
    float64 and fp16, where its fp32 and bf16 kernels give NaN."""
    _nan_and_inf_case(path, dtype, act)


@pytest.mark.parametrize("act", ACTIVATIONS, ids=IDS)
def test_gradcheck_and_opcheck(act):
    name, slope, approx = act
    x, w, b = (torch.randn(*s, dtype=torch.float64, requires_grad=True) for s in ((6, 5), (4, 5), (4,)))
    assert torch.autograd.gradcheck(lambda *a: bigmodel.fused_linear(*a, name, slope, approx), (x, w, b))
    if name == "relu":
        return  # bigmodel::linear_relu: tests/test_linear_relu.py
    op_name = {None: "none", "gelu": "gelu" if approx == "none" else "gelu_tanh"}.get(name, name)
    for sample in [(torch.randn(7, 5), torch.randn(3, 5), torch.randn(3)),
                   (torch.randn(5, 7).t().requires_grad_(), torch.randn(3, 5).requires_grad_(), None),
                   (torch.randn(0, 5), torch.randn(3, 5), torch.randn(3)), (torch.randn(7, 0), torch.randn(3, 0), None)]:
        torch.library.opcheck(torch.ops.bigmodel.fused_linear.default, (*sample, op_name, slope))
        torch.library.opcheck(torch.ops.bigmodel.fused_linear.default, (*sample, op_name, slope, False))


@pytest.mark.parametrize("act", ["gelu", "gelu_tanh", "silu", "leaky_relu"])
@pytest.mark.parametrize("path", ["cpp", "triton"])
def test_pre_activation_only_where_autograd_records(path, act):
    """keep_pre=False (what bigmodel.fused_linear passes): no pre-activation in inference, one
    output written instead of two, with the same values; where autograd records the call it comes
    back all the same, and the backward that reads it runs."""
    slope = -0.2 if act == "leaky_relu" else 0.01
    m, k, n = (37, 19, 23) if path == "cpp" else (9, 7, 5)
    x, w, b = _inputs(m, k, n, torch.float32)
    op = torch.ops.bigmodel.fused_linear.default
    with on(path):
        with torch.no_grad():
            kept, pre = op(x, w, b, act, slope, True)
            out, none = op(x, w, b, act, slope, False)
            public = bigmodel.fused_linear(x, w, b, act.replace("_tanh", ""), slope,
                                           "tanh" if act == "gelu_tanh" else "none")
        assert pre.shape == (m, n) and none.numel() == 0
        assert torch.equal(out, kept) and torch.equal(public, kept)
        out, pre = op(x, w, b, act, slope, False)  # recorded: x, w and b require grad
        assert pre.shape == (m, n) and torch.equal(out.detach(), kept)
        dx, dw, db = torch.autograd.grad(out, (x, w, b), torch.ones_like(out))
        ref = torch.autograd.grad(op(x, w, b, act, slope, True)[0], (x, w, b), torch.ones_like(out))
    for got, want in zip((dx, dw, db), ref):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


class _DropsGradient(torch.autograd.Function):
    """sum(y) whose backward passes no gradient on (None): the op's node then runs without one."""

    @staticmethod
    def forward(ctx, y):
        return y.sum()

    @staticmethod
    def backward(ctx, grad):
        return None


@pytest.mark.parametrize("op", ["gelu", "relu", "attention"])
def test_no_output_gradient_gives_no_input_gradient(op):
    """As eager's nodes: inputs get no gradient (None), not a backward over zeros."""
    x, w, b = _inputs(6, 5, 4, torch.float32)
    if op == "attention":
        ours = bigmodel.scaled_dot_product_attention(*(t.unsqueeze(0) for t in (w, w, w)))
    else:
        ours = bigmodel.fused_linear(x, w, b, op)
    (_DropsGradient.apply(ours) + 0 * x.sum()).backward()
    assert x.grad is not None and not x.grad.any()  # the path outside the op still runs
    assert w.grad is None and b.grad is None


@pytest.mark.parametrize("act", ["gelu", "silu", "leaky_relu"])
def test_backward_makes_no_gradient_for_pre(act):
    """GELU, SiLU and LeakyReLU with a negative slope return the pre-activation too. It has no
    gradient, and autograd must not fill one: a zero tensor of the output's size per backward
    was 13 of the 70 ms of 16384x16->1024 GELU's backward."""
    x, w, b = _inputs(64, 8, 48, torch.float32)
    slope = -0.2 if act == "leaky_relu" else 0.01
    y = bigmodel.fused_linear(x, w, b, act, slope)
    grad = torch.randn_like(y)
    with torch.profiler.profile(record_shapes=True) as prof:
        torch.autograd.grad(y, (x, w, b), grad)
    fills = [e for e in prof.events() if e.name in ("aten::fill_", "aten::zero_", "aten::zeros", "aten::zeros_like")
             and any(list(s) == list(y.shape) for s in e.input_shapes)]
    assert not fills, [(e.name, e.input_shapes) for e in fills]


@pytest.mark.parametrize("act", ACTIVATIONS, ids=IDS)
def test_torch_compile_fullgraph_and_autocast(act):
    name, slope, approx = act
    torch._dynamo.reset()
    layer = bigmodel.nn.FusedLinear(12, 9, activation=name, negative_slope=slope, approximate=approx)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = torch.randn(6, 12, requires_grad=True)
    torch.testing.assert_close(compiled(x), layer(x))
    (gx,) = torch.autograd.grad(compiled(x).sum(), x)
    (gx_ref,) = torch.autograd.grad(layer(x).sum(), x)
    torch.testing.assert_close(gx, gx_ref)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        ref = ref_fused_linear(x, layer.weight, layer.bias, name, slope, approx)
    assert y.dtype == ref.dtype == torch.bfloat16


_X, _W = torch.randn(3, 4), torch.randn(5, 4)
FL = bigmodel.fused_linear


def _under(name, fn, *args):
    with bigmodel.use_backend(name):
        return fn(*args)


ERROR_CASES = {  # docs/errors.md's fl- rows: (call, the argument the message names, needs CUDA)
    "fl-activation": (lambda mp: FL(_X, _W, None, "swish"), "activation", False),
    "fl-approximate": (lambda mp: FL(_X, _W, None, "gelu", approximate="erf"), "approximate", False),
    "fl-slope-type": (lambda mp: FL(_X, _W, None, "leaky_relu", "0.1"), "negative_slope", False),
    "fl-in-features": (lambda mp: FL(_X, torch.randn(5, 6), None, "gelu"), "input", False),
    "fl-dtype": (lambda mp: FL(_X, _W, torch.randn(5, dtype=torch.float64), "silu"), "bias", False),
    "fl-op-activation": (lambda mp: torch.ops.bigmodel.fused_linear(_X, _W, None, "swish", 0.0), "swish", False),
    "fl-module-activation": (lambda mp: bigmodel.nn.FusedLinear(4, 5, activation="swish"), "activation", False),
    "fl-cublaslt-activation": (lambda mp: _under("cublaslt", FL, _X, _W, None, "silu"), "activation", False),
    "fl-cublaslt-op-activation": (lambda mp: _under("cublaslt", torch.ops.bigmodel.fused_linear, _X.cuda(),
                                                    _W.cuda(), None, "silu", 0.0), "silu", True),
}


def test_error_rows_are_all_covered():
    assert set(ERROR_CASES) == set(rows_of("fl"))


@pytest.mark.parametrize("ident", sorted(ERROR_CASES))
def test_error_row(ident, monkeypatch):
    check_row(ident, ERROR_CASES[ident], monkeypatch)


class TestFusedLinear:
    def test_parameters_init_state_dict_and_repr(self):
        torch.manual_seed(0)
        ours = bigmodel.nn.FusedLinear(20, 7, activation="leaky_relu", negative_slope=0.2)
        torch.manual_seed(0)
        theirs = torch.nn.Linear(20, 7)
        assert list(ours.state_dict()) == list(theirs.state_dict()) == ["weight", "bias"]
        assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), theirs.parameters()))
        assert repr(ours) == ("FusedLinear(in_features=20, out_features=7, bias=True, activation='leaky_relu', "
                              "negative_slope=0.2)")
        assert repr(bigmodel.nn.FusedLinear(3, 2, activation="gelu", approximate="tanh")).endswith(
            "activation='gelu', approximate='tanh')")
        assert isinstance(ours, torch.nn.Linear)

    @pytest.mark.parametrize("act", ACTIVATIONS, ids=IDS)
    def test_loads_linear_state_dict_both_ways_and_matches(self, act):
        name, slope, approx = act
        linear = torch.nn.Linear(11, 6, dtype=torch.float64)
        fused = bigmodel.nn.FusedLinear(11, 6, activation=name, negative_slope=slope, approximate=approx,
                                        dtype=torch.float64)
        fused.load_state_dict(linear.state_dict(), strict=True)
        linear.load_state_dict(fused.state_dict(), strict=True)
        x = torch.randn(4, 3, 11, dtype=torch.float64)
        torch.testing.assert_close(fused(x), ref_fused_linear(x, linear.weight, linear.bias, name, slope, approx))

    def test_from_linear_shares_parameters(self):
        linear = torch.nn.Linear(4, 3)
        fused = bigmodel.nn.FusedLinear.from_linear(linear, "silu")
        assert fused.weight is linear.weight and fused.bias is linear.bias and fused.activation == "silu"
        relu = bigmodel.nn.FusedLinearReLU.from_linear(linear)
        assert type(relu) is bigmodel.nn.FusedLinearReLU and relu.weight is linear.weight
        assert torch.equal(relu(torch.ones(2, 4)), F.relu(linear(torch.ones(2, 4))))


# ---------------------------------------------------------------------------------------------
# The 'cublaslt' backend on the H200 (bench/device_check.sh): cuBLASLt's GELU_AUX_BIAS and BIAS
# epilogues (csrc/cuda/fused_linear_cublaslt.cu) for the activations it fuses.

CUBLASLT_ACTIVATIONS = [(None, 0.01, "none"), ("gelu", 0.01, "tanh")]
CUBLASLT_IDS = ["none", "gelu-tanh"]
CUDA_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _cuda(x, w, b):
    return [t.detach().cuda().requires_grad_() if t is not None else None for t in (x, w, b)]


@pytest.fixture
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


@pytest.mark.cuda
@pytest.mark.parametrize("fused", [True, False], ids=["epilogue", "fallback"])
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=str)
@pytest.mark.parametrize("act", CUBLASLT_ACTIVATIONS, ids=CUBLASLT_IDS)
def test_cuda_cublaslt_matches_float64_reference(act, dtype, fused, monkeypatch, _no_tf32):
    """Output, gradients and the saved pre-activation against float64, at odd and real sizes
    (N = 7 and 113: GELU's auxiliary output needs N % 8 == 0, so those take the fallback even
    with the epilogue on), x transposed too, K = 0; the fallback forced by
    BIGMODEL_CUBLASLT_EPILOGUE=0."""
    if not fused:
        monkeypatch.setenv("BIGMODEL_CUBLASLT_EPILOGUE", "0")
    name, slope, approx = act
    for m, k, n in [(1, 1, 1), (7, 7, 7), (113, 1023, 7), (1023, 7, 113), (1023, 784, 512),
                    (4096, 256, 1024), (64, 0, 24)]:
        for bias in (True, False):
            x, w, b = _cuda(*_inputs(m, k, n, dtype, bias))
            _check("cublaslt", x, w, b, act, f"{(m, k, n)} bias={bias}")
            xt = x.detach().t().contiguous().t().requires_grad_()
            _check("cublaslt", xt, w, b, act, f"{(m, k, n)} bias={bias} transposed x")
            if name == "gelu":
                with bigmodel.use_backend("cublaslt"):
                    pre = torch.ops.bigmodel.fused_linear(x.detach(), w.detach(), None if b is None else b.detach(),
                                                          "gelu_tanh", slope)[1]
                bias64 = None if b is None else b.detach().double()
                z64 = F.linear(x.detach().double(), w.detach().double(), bias64)
                peer = F.linear(x.detach(), w.detach(), None if b is None else b.detach())
                assert_matches(pre, peer, z64, FORWARD, f"cublaslt {(m, k, n)} pre")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=str)
@pytest.mark.parametrize("act", CUBLASLT_ACTIVATIONS, ids=CUBLASLT_IDS)
def test_cuda_cublaslt_nan_and_inf(act, dtype):
    _nan_and_inf_case("cublaslt", dtype, act, device="cuda")


@pytest.mark.cuda
def test_cuda_cublaslt_opcheck_and_compile():
    torch._dynamo.reset()
    with bigmodel.use_backend("cublaslt"):
        for op_name in ("none", "gelu_tanh"):
            for x, w, b in [_cuda(*_inputs(7, 5, 3, torch.float32)), _cuda(*_inputs(113, 64, 128, torch.float16)),
                            _cuda(*_inputs(0, 5, 3, torch.bfloat16))]:
                torch.library.opcheck(torch.ops.bigmodel.fused_linear.default, (x, w, b, op_name, 0.0))
        x, w, b = _cuda(*_inputs(64, 32, 48, torch.float32))
        fn = lambda x, w, b: bigmodel.fused_linear(x, w, b, "gelu", approximate="tanh").sum()  # noqa: E731
        (gx,) = torch.autograd.grad(torch.compile(fn, fullgraph=True)(x, w, b), x)
        (gx_eager,) = torch.autograd.grad(fn(x, w, b), x)
        torch.testing.assert_close(gx, gx_eager)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            assert bigmodel.fused_linear(x, w, b, "gelu", approximate="tanh").dtype == torch.bfloat16
