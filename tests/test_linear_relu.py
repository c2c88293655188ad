"""bigmodel.linear_relu and FusedLinearReLU against the float64 reference, on every path CI has:
the C++ engine, the Triton kernels under the interpreter, and the reference backend."""
import pytest
import torch
import torch.nn.functional as F

import bigmodel
from bigmodel.ops import _registry
from bigmodel.reference import ref_linear_relu
from relu_grads import relu_grads_through_output
from tolerances import assert_close_gemm

# (backend, dtype) pairs CI can run. The interpreter's bf16 is broken, so Triton gets fp32/fp16.
CPP = [("cpp", d) for d in (torch.float32, torch.float64, torch.bfloat16, torch.float16)]
TRITON = [("triton", d) for d in (torch.float32, torch.float16)]
PATHS = CPP + TRITON + [("reference", torch.float32)]
# Triton under the interpreter costs ~ms per tile step: keep its shapes small.
SHAPES_CPP = [(1, 1, 1), (7, 13, 5), (113, 64, 33), (1023, 130, 71), (64, 784, 512)]
SHAPES_TRITON = [(1, 7, 5), (7, 13, 1), (113, 40, 33), (65, 70, 66)]


def _inputs(m, k, n, dtype, bias=True, requires_grad=True):
    # Scaled so fp16 stays well inside its range and ~half the outputs are positive.
    x = torch.randn(m, k, dtype=dtype) / k**0.25
    w = torch.randn(n, k, dtype=dtype) / k**0.25
    b = torch.randn(n, dtype=dtype) if bias else None
    for t in (x, w, b):
        if t is not None:
            t.requires_grad_(requires_grad)
    return x, w, b


def _reference(x, w, b, grad, y):
    """float64 output, and float64 gradients through the mask of the output under test, y."""
    y_ref = ref_linear_relu(x.detach().double(), w.detach().double(),
                            b.detach().double() if b is not None else None)
    grads = relu_grads_through_output(y, grad, x, w, b)
    return y_ref, [g for g in grads if g is not None]


def _check(backend, dtype, x, w, b, k):
    with bigmodel.use_backend(backend):
        y = bigmodel.linear_relu(x, w, b)
        assert y.dtype == dtype and y.shape == (*x.shape[:-1], w.shape[0])
        grad = torch.randn_like(y)
        leaves = [t for t in (x, w, b) if t is not None]
        grads = torch.autograd.grad(y, leaves, grad)
    y_ref, grads_ref = _reference(x, w, b, grad, y)
    assert_close_gemm(y, y_ref, dtype, k, f"{backend} forward")
    names = ["grad_input", "grad_weight", "grad_bias"]
    m = x.numel() // max(x.shape[-1], 1)
    for name, g, r in zip(names, grads, grads_ref):
        # grad_weight/bias reduce over the M rows, grad_input over N outputs.
        assert_close_gemm(g, r, dtype, max(k, m, w.shape[0]), f"{backend} {name}")


@pytest.mark.parametrize("backend,dtype", CPP + TRITON, ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_matches_float64_reference(backend, dtype, bias):
    shapes = SHAPES_CPP if backend == "cpp" else SHAPES_TRITON
    for m, k, n in shapes:
        _check(backend, dtype, *_inputs(m, k, n, dtype, bias), k)


@pytest.mark.parametrize("backend,dtype", PATHS, ids=str)
def test_leading_dims_and_strides(backend, dtype):
    # 3-D input, 1-D input, and inputs that are not contiguous (transposed and sliced).
    base = torch.randn(2, 5, 33, dtype=dtype)
    _, w, b = _inputs(1, 33, 17, dtype)
    cases = [
        base.clone().requires_grad_(),
        torch.randn(33, dtype=dtype, requires_grad=True),
        torch.randn(33, 9, dtype=dtype).t().requires_grad_(),           # transposed
        torch.randn(9, 66, dtype=dtype)[:, ::2].requires_grad_(),       # strided columns
        torch.randn(4, 33, 3, dtype=dtype).transpose(1, 2).requires_grad_(),  # 3-D, permuted
    ]
    for x in cases:
        _check(backend, dtype, x, w, b, 33)
    wt = torch.randn(33, 17, dtype=dtype).t().requires_grad_()  # non-contiguous weight
    _check(backend, dtype, cases[0], wt, b, 33)


@pytest.mark.parametrize("backend,dtype", PATHS, ids=str)
def test_empty_batch(backend, dtype):
    x, w, b = _inputs(0, 12, 5, dtype)
    with bigmodel.use_backend(backend):
        y = bigmodel.linear_relu(x.reshape(0, 0, 12), w, b)
        assert y.shape == (0, 0, 5)
        y.sum().backward()
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))


@pytest.mark.parametrize("backend,dtype", PATHS, ids=str)
def test_nan_propagates_to_exactly_its_row_and_column(backend, dtype):
    x, w, b = _inputs(9, 16, 7, dtype, requires_grad=False)
    x[3, 5] = float("nan")
    w[2, 0] = float("nan")
    with bigmodel.use_backend(backend):
        y = bigmodel.linear_relu(x, w, b)
    expect = torch.zeros(9, 7, dtype=torch.bool)
    expect[3, :] = True
    expect[:, 2] = True
    # tl.maximum(x, 0) or cuBLASLt's ReLU would turn these into 0.
    assert torch.equal(torch.isnan(y), expect)


@pytest.mark.parametrize("backend,dtype", [("cpp", torch.float32), ("triton", torch.float32)], ids=str)
def test_relu_gradient_mask_matches_torch(backend, dtype):
    # Exactly-zero pre-activations (bias cancels) and negative ones get no gradient, as in torch.
    x = torch.zeros(4, 3, dtype=dtype, requires_grad=True)
    w = torch.randn(5, 3, dtype=dtype, requires_grad=True)
    b = torch.tensor([0.0, -1.0, 2.0, 0.5, -0.5], dtype=dtype, requires_grad=True)
    with bigmodel.use_backend(backend):
        bigmodel.linear_relu(x, w, b).sum().backward()
    x2, w2, b2 = (t.detach().clone().requires_grad_() for t in (x, w, b))
    F.relu(F.linear(x2, w2, b2)).sum().backward()
    for ours, theirs in ((x.grad, x2.grad), (w.grad, w2.grad), (b.grad, b2.grad)):
        torch.testing.assert_close(ours, theirs)


def test_only_requested_gradients_are_computed():
    x, w, b = _inputs(8, 6, 4, torch.float64, requires_grad=False)
    w.requires_grad_()
    y = bigmodel.linear_relu(x, w, b)
    (gw,) = torch.autograd.grad(y.sum(), [w])
    _, (_, gw_ref, _) = _reference(x, w, b, torch.ones_like(y), y)
    torch.testing.assert_close(gw, gw_ref)


def test_gradcheck_float64():
    x, w, b = _inputs(7, 5, 4, torch.float64)
    assert torch.autograd.gradcheck(bigmodel.linear_relu, (x, w, b))
    assert torch.autograd.gradcheck(lambda x, w: bigmodel.linear_relu(x, w), (x, w))


def test_deterministic_run_to_run():
    x, w, b = _inputs(300, 70, 50, torch.float32)
    outs = []
    for _ in range(2):
        y = bigmodel.linear_relu(x, w, b)
        outs.append((y, *torch.autograd.grad(y, (x, w, b), torch.ones_like(y))))
    assert all(torch.equal(a, c) for a, c in zip(*outs))


@pytest.mark.parametrize(
    "make,error,words",
    [
        (lambda: (torch.randn(3, 5), torch.randn(4, 6), None), ValueError, ["(3, 5)", "(4, 6)"]),
        (lambda: (torch.randn(3, 5), torch.randn(4, 5), torch.randn(3)), ValueError, ["bias", "(3,)"]),
        (lambda: (torch.randn(3, 5), torch.randn(4, 5, 1), None), ValueError, ["weight", "(4, 5, 1)"]),
        (lambda: (torch.randn(3, 5), torch.randn(4, 5, dtype=torch.float64), None), TypeError, ["float64"]),
        (lambda: (torch.ones(3, 5, dtype=torch.int64), torch.ones(4, 5, dtype=torch.int64), None),
         TypeError, ["int64"]),
        (lambda: (torch.tensor(1.0), torch.randn(4, 1), None), ValueError, ["0-d"]),
        (lambda: (torch.randn(3, 5), torch.randn(4, 5, device="meta"), None), ValueError, ["meta"]),
    ],
)
def test_bad_input_raises_clear_error(make, error, words):
    x, w, b = make()
    with pytest.raises(error) as info:
        bigmodel.linear_relu(x, w, b)
    for word in words:
        assert word in str(info.value)


def test_opcheck():
    samples = [
        _inputs(7, 5, 3, torch.float32),
        _inputs(7, 5, 3, torch.float64, bias=False),
        (torch.randn(5, 7).t(), torch.randn(3, 5), torch.randn(3)),  # non-contiguous
        _inputs(0, 5, 3, torch.float32),                                # empty batch
    ]
    for x, w, b in samples:
        torch.library.opcheck(torch.ops.bigmodel.linear_relu.default, (x, w, b))


def test_torch_compile_fullgraph_no_graph_breaks():
    torch._dynamo.reset()
    model = torch.nn.Sequential(bigmodel.nn.FusedLinearReLU(12, 9), bigmodel.nn.FusedLinearReLU(9, 4))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(6, 12, requires_grad=True)
    y = compiled(x)
    (gx,) = torch.autograd.grad(y.sum(), x)
    y_ref = model(x)
    (gx_ref,) = torch.autograd.grad(y_ref.sum(), x)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(gx, gx_ref)
    explained = torch._dynamo.explain(model)(x)
    assert explained.graph_break_count == 0


def test_autocast_cpu_runs_in_bfloat16():
    x, w, b = _inputs(5, 8, 3, torch.float32, requires_grad=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = bigmodel.linear_relu(x, w, b)
        y_op = torch.ops.bigmodel.linear_relu(x, w, b)
        ref = F.relu(F.linear(x, w, b))
    assert y.dtype == y_op.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref.float(), atol=0.05, rtol=0.02)


class TestFusedLinearReLU:
    def test_same_parameters_init_state_dict_and_repr_as_linear(self):
        torch.manual_seed(0)
        ours = bigmodel.nn.FusedLinearReLU(20, 7)
        torch.manual_seed(0)
        theirs = torch.nn.Linear(20, 7)
        assert list(ours.state_dict()) == list(theirs.state_dict()) == ["weight", "bias"]
        for a, b in zip(ours.parameters(), theirs.parameters()):
            assert torch.equal(a, b)
        assert repr(ours) == "FusedLinearReLU(in_features=20, out_features=7, bias=True)"
        assert isinstance(ours, torch.nn.Linear)
        assert list(bigmodel.nn.FusedLinearReLU(3, 2, bias=False).state_dict()) == ["weight"]

    def test_loads_linear_state_dict_both_ways_and_matches(self):
        linear = torch.nn.Linear(11, 6, dtype=torch.float64)
        fused = bigmodel.nn.FusedLinearReLU(11, 6, dtype=torch.float64)
        fused.load_state_dict(linear.state_dict(), strict=True)
        linear.load_state_dict(fused.state_dict(), strict=True)
        x = torch.randn(4, 3, 11, dtype=torch.float64)
        torch.testing.assert_close(fused(x), F.relu(linear(x)))

    def test_from_linear_shares_parameters(self):
        linear = torch.nn.Linear(4, 3)
        fused = bigmodel.nn.FusedLinearReLU.from_linear(linear)
        assert fused.weight is linear.weight and fused.bias is linear.bias
        assert repr(fused) == "FusedLinearReLU(in_features=4, out_features=3, bias=True)"

    def test_factory_kwargs(self):
        m = bigmodel.nn.FusedLinearReLU(3, 2, device="meta", dtype=torch.float16)
        assert m.weight.device.type == "meta" and m.weight.dtype == torch.float16


class TestBackends:
    def test_env_var_and_context_manager(self, monkeypatch):
        from bigmodel import backend

        monkeypatch.setenv("BIGMODEL_BACKEND", "reference")
        assert backend.current() == "reference"
        with bigmodel.use_backend("cpp"):
            assert backend.current() == "cpp"
            with bigmodel.use_backend("triton"):
                assert backend.current() == "triton"
            assert backend.current() == "cpp"
        monkeypatch.setenv("BIGMODEL_BACKEND", "nope")
        with pytest.raises(ValueError, match="BIGMODEL_BACKEND"):
            backend.current()

    def test_unknown_backend_is_an_error(self):
        with pytest.raises(ValueError, match="unknown backend 'fast'"):
            with bigmodel.use_backend("fast"):
                pass

    def test_missing_extension_says_how_to_build(self, monkeypatch):
        monkeypatch.setattr(_registry, "_C", None)
        x, w, b = _inputs(2, 3, 4, torch.float32, requires_grad=False)
        with pytest.raises(_registry.ExtensionNotBuilt, match="make build"):
            bigmodel.linear_relu(x, w, b)
        with bigmodel.use_backend("reference"):  # other backends keep working
            bigmodel.linear_relu(x, w, b)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("tf32", [False, True], ids=["ieee", "tf32"])
def test_cuda_matches_float64_reference(dtype, tf32):
    if tf32 and dtype != torch.float32:
        pytest.skip("tf32 only concerns fp32")
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        for m, k, n in [(1, 7, 5), (113, 1023, 7), (1023, 784, 512), (4096, 256, 1024)]:
            x, w, b = (t.cuda() if t is not None else None for t in _inputs(m, k, n, dtype))
            x, w, b = (t.detach().requires_grad_() for t in (x, w, b))
            with bigmodel.use_backend("auto"):
                y = bigmodel.linear_relu(x, w, b)
                grad = torch.randn_like(y)
                grads = torch.autograd.grad(y, (x, w, b), grad)
            y_ref, grads_ref = _reference(x, w, b, grad, y)
            if tf32:
                from tolerances import TF32_GEMM
                atol, rtol = (v * max(k, m) ** 0.5 for v in TF32_GEMM)
                torch.testing.assert_close(y.double(), y_ref, atol=atol, rtol=rtol)
                continue
            assert_close_gemm(y, y_ref, dtype, k, "cuda forward")
            for g, r in zip(grads, grads_ref):
                assert_close_gemm(g, r, dtype, max(k, m, n), "cuda backward")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


@pytest.mark.cuda
def test_cuda_nan_rows_and_empty():
    x = torch.randn(300, 128, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(200, 128, device="cuda", dtype=torch.bfloat16)
    x[17, 3] = float("nan")
    y = bigmodel.linear_relu(x, w)
    assert torch.isnan(y[17]).all() and not torch.isnan(y[:17]).any() and not torch.isnan(y[18:]).any()
    assert bigmodel.linear_relu(x[:0], w).shape == (0, 200)


def test_fp32_without_onednn_uses_the_blocked_mkl_path(tmp_path):
    """fp32 goes to oneDNN when torch has it; BIGMODEL_NO_ONEDNN=1 forces the blocked BLAS path
    (the one fp64 and outputs of 32 MB and more take), checked here for fp32 too."""
    import os
    import subprocess
    import sys

    script = (
        "import sys; sys.path.insert(0, 'tests')\n"
        "import torch, test_linear_relu as T\n"
        "for m, k, n in [(113, 64, 33), (1023, 130, 71)]:\n"
        "    for bias in (True, False):\n"
        "        T._check('cpp', torch.float32, *T._inputs(m, k, n, torch.float32, bias), k)\n"
    )
    env = dict(os.environ, BIGMODEL_NO_ONEDNN="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
