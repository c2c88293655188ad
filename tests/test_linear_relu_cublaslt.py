"""bigmodel::linear_relu_cublaslt, the cuBLASLt backend of linear+ReLU (csrc/cuda/linear_relu_cublaslt.cu).

Tests marked ``cuda`` run on the H200 (bench/device_check.sh) against the float64 reference. The
others run anywhere: the built extension carries sm_90 code for the kernels, the ops are
registered, and the fake kernels and autograd plumbing hold on meta tensors (opcheck).
"""
import contextlib
import glob
import os
import shutil
import subprocess

import pytest
import torch
import torch.nn.functional as F

from bigmodel.ops import _registry
from bigmodel.ops import linear_relu_cublaslt as lrc
from bigmodel.reference import ref_linear_relu
from tolerances import GEMM, TF32_GEMM, gemm_tol

needs_ops = pytest.mark.skipif(not _registry.has_ops(), reason="bigmodel._C is not built")
OP = "bigmodel::linear_relu_cublaslt"

# (dtype, tf32) modes; fp32 runs both as IEEE and as TF32 (torch.backends.cuda.matmul.allow_tf32).
MODES = [(torch.float32, False), (torch.float32, True), (torch.float16, False), (torch.bfloat16, False)]
MODE_IDS = ["fp32", "tf32", "fp16", "bf16"]
# (M, K, N): the odd sizes 1/7/113/1023 in every position, and one aligned shape.
SHAPES = [(1, 1, 1), (7, 7, 7), (1, 113, 1023), (113, 1023, 7), (1023, 7, 113), (1023, 1023, 1023),
          (256, 512, 384)]


def _built_with_cuda():
    return _registry.has_ops() and _registry._C.built_with_cuda()


# ---------------------------------------------------------------------------------------------
# Helpers


@contextlib.contextmanager
def _tf32(enabled):
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def _tol(dtype, tf32, k):
    if tf32:
        return tuple(v * max(k, 1) ** 0.5 for v in TF32_GEMM)
    return gemm_tol(dtype, k)


def _close(actual, expected, dtype, tf32, k, what):
    atol, rtol = _tol(dtype, tf32, k)
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol, equal_nan=True,
                               msg=lambda m: f"{what} ({dtype}, tf32={tf32}, K={k}): {m}")


def _inputs(m, k, n, dtype, bias=True, device="cuda"):
    # Scaled so ~half the pre-activations are positive and fp16 stays far inside its range.
    x = torch.randn(m, k, device=device, dtype=dtype) / max(k, 1) ** 0.25
    w = torch.randn(n, k, device=device, dtype=dtype) / max(k, 1) ** 0.25
    b = torch.randn(n, device=device, dtype=dtype) if bias else None
    return x, w, b


def _unpack(mask, n):
    """The (M, N) bool matrix in the mask: bit n of row m is bit n % 8 of byte n // 8 (LSB first)."""
    shifts = torch.arange(8, device=mask.device, dtype=torch.uint8)
    bits = (mask.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(mask.shape[0], -1)[:, :n].bool()


def _run(x, w, b):
    """Forward and all gradients through the registered op and its autograd."""
    leaves = [t.detach().requires_grad_() for t in (x, w, b) if t is not None]
    xl, wl = leaves[0], leaves[1]
    bl = leaves[2] if b is not None else None
    out, mask = torch.ops.bigmodel.linear_relu_cublaslt(xl, wl, bl)
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, grad)
    return out, mask, grad, grads


def _masked_reference_grads(x, w, grad, keep):
    """float64 gradients for a given ReLU mask: dZ = grad * keep, dX = dZ W, dW = dZ^T X, db = sum dZ."""
    dz = grad.double() * keep
    return dz @ w.double(), dz.t() @ x.double(), dz.sum(0)


def _check_all(x, w, b, dtype, tf32, what=""):
    m, k = x.shape
    n = w.shape[0]
    with _tf32(tf32):
        out, mask, grad, grads = _run(x, w, b)
    assert out.shape == (m, n) and out.dtype == dtype and out.is_contiguous()
    assert mask.shape == (m, lrc.mask_bytes_per_row(n)) and mask.dtype == torch.uint8
    ref = ref_linear_relu(x.double(), w.double(), b.double() if b is not None else None)
    _close(out, ref, dtype, tf32, k, f"{what} forward")

    # The mask is what the kernel's backward uses; away from 0 it must agree with float64's sign.
    keep = _unpack(mask, n)
    z = F.linear(x.double(), w.double(), b.double() if b is not None else None)
    atol, _ = _tol(dtype, tf32, k)
    clear = (z.abs() > 4 * atol + 4 * GEMM[dtype][1] * z.abs()) | torch.isnan(z)
    expected = (z > 0) | torch.isnan(z)
    bad = (keep != expected) & clear
    assert not bad.any(), (
        f"{what}: {int(bad.sum())} mask bits disagree with sign(x W^T + b), e.g. at "
        f"{bad.nonzero()[:5].tolist()}: cuBLASLt's ReLU bit-mask layout is not the assumed "
        f"column-major, LSB-first one (see csrc/cuda/linear_relu_cublaslt.cu)"
    )
    # Where the output is clearly nonzero the mask must be set, and where the mask is clear the
    # output must be exactly 0.
    assert not (~keep & (out != 0) & ~torch.isnan(out)).any(), f"{what}: mask clear but output nonzero"

    dx_ref, dw_ref, db_ref = _masked_reference_grads(x, w, grad, keep)
    _close(grads[0], dx_ref, dtype, tf32, n, f"{what} grad_input")
    _close(grads[1], dw_ref, dtype, tf32, m, f"{what} grad_weight")
    if b is not None:
        _close(grads[2], db_ref, dtype, tf32, m, f"{what} grad_bias")
    return out, mask, grads


# ---------------------------------------------------------------------------------------------
# CPU-runnable: build, registration, fake kernels, autograd plumbing.


def _cuobjdump():
    candidates = [shutil.which("cuobjdump")]
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(os.path.join(os.environ[var], "bin", "cuobjdump"))
    candidates += sorted(glob.glob("/usr/local/cuda*/bin/cuobjdump"), reverse=True)
    try:  # triton's wheel ships one
        import triton

        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    except ImportError:
        pass
    return next((c for c in candidates if c and os.path.isfile(c) and os.access(c, os.X_OK)), None)


@needs_ops
@pytest.mark.skipif(not _built_with_cuda(), reason="bigmodel._C was built without CUDA")
def test_extension_carries_sm90_code_and_registers_cuda_kernels():
    for name in (OP, OP + "_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA"), f"{name} has no CUDA kernel"
    assert lrc.available()
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump to list the extension's device code")
    so = _registry._C.__file__
    elves = subprocess.run([tool, "--list-elf", so], capture_output=True, text=True, check=True).stdout
    assert "sm_90" in elves, f"no sm_90 cubin in {so}:\n{elves}"
    usage = subprocess.run([tool, "--dump-resource-usage", so], capture_output=True, text=True, check=True).stdout
    for kernel in ("row_absmax_kernel", "nan_fixup_kernel", "relu_mask_grad_kernel", "bias_relu_mask_kernel"):
        assert kernel in usage, f"{kernel} missing from the extension's device code"


@needs_ops
def test_schemas():
    fwd = str(torch.ops.bigmodel.linear_relu_cublaslt.default._schema)
    bwd = str(torch.ops.bigmodel.linear_relu_cublaslt_backward.default._schema)
    assert fwd == ("bigmodel::linear_relu_cublaslt(Tensor input, Tensor weight, Tensor? bias) "
                   "-> (Tensor out, Tensor relu_mask)")
    assert bwd.startswith("bigmodel::linear_relu_cublaslt_backward(Tensor grad_output, Tensor relu_mask, "
                          "Tensor input, Tensor weight, bool[3] output_mask)")


@needs_ops
@pytest.mark.parametrize("m,k,n", [(7, 5, 3), (1, 1, 1), (0, 5, 129), (9, 0, 128), (5, 3, 0)])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_opcheck_on_meta_tensors(m, k, n, bias):
    x, w, b = _inputs(m, k, n, torch.float32, bias, device="meta")
    args = tuple(t.requires_grad_() if t is not None else None for t in (x, w, b))
    torch.library.opcheck(torch.ops.bigmodel.linear_relu_cublaslt.default, args)
    out, mask = torch.ops.bigmodel.linear_relu_cublaslt(*args)
    assert out.shape == (m, n) and mask.shape == (m, (n + 127) // 128 * 16) and mask.dtype == torch.uint8
    grad = torch.randn(m, n, device="meta")
    torch.library.opcheck(torch.ops.bigmodel.linear_relu_cublaslt_backward.default,
                          (grad, mask, x.detach(), w.detach(), [True, True, bias]))


@needs_ops
def test_autograd_on_meta_gives_only_requested_gradients():
    x, w, b = _inputs(6, 4, 130, torch.float16, device="meta")
    w.requires_grad_()
    y = lrc.linear_relu_cublaslt(x, w, b)
    assert y.shape == (6, 130) and y.requires_grad
    (gw,) = torch.autograd.grad(y.sum(), [w])
    assert gw.shape == w.shape and gw.dtype == torch.float16
    x.requires_grad_()
    b.requires_grad_()
    gx, gw, gb = torch.autograd.grad(lrc.linear_relu_cublaslt(x, w, b).sum(), [x, w, b])
    assert (gx.shape, gw.shape, gb.shape) == (x.shape, w.shape, b.shape)


@needs_ops
def test_fake_kernel_with_symbolic_shapes():
    from torch.fx.experimental.proxy_tensor import make_fx

    def f(x, w, b):
        out, mask = torch.ops.bigmodel.linear_relu_cublaslt(x, w, b)
        return out, mask

    gm = make_fx(f, tracing_mode="symbolic")(*_inputs(5, 3, 200, torch.float32, device="cpu"))
    nodes = [nd for nd in gm.graph.nodes if nd.op == "call_function" and "linear_relu_cublaslt" in str(nd.target)]
    assert len(nodes) == 1
    out_meta, mask_meta = nodes[0].meta["val"]
    # Sizes stay symbolic (no specialisation on N) and the mask row is ceil(N / 128) * 16 bytes.
    assert isinstance(out_meta.shape[1], torch.SymInt) and isinstance(mask_meta.shape[1], torch.SymInt)
    assert mask_meta.shape[1].node.hint == 32


def test_module_imports_and_errors_without_gpu():
    assert isinstance(lrc.available(), bool)
    x, w, b = _inputs(3, 5, 4, torch.float32, device="cpu")
    assert not lrc.supports(x, w, b)  # CPU tensors
    with pytest.raises(ValueError, match=r"\(3, 5\).*\(4, 6\)"):
        lrc.linear_relu_cublaslt(x, torch.randn(4, 6), b)
    with pytest.raises(ValueError, match="2-D"):
        lrc.linear_relu_cublaslt(x.unsqueeze(0), w, b)


# ---------------------------------------------------------------------------------------------
# CUDA (the H200).


@pytest.mark.cuda
@pytest.mark.parametrize("dtype,tf32", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("m,k,n", SHAPES, ids=str)
def test_cuda_matches_float64_reference(m, k, n, dtype, tf32, bias):
    x, w, b = _inputs(m, k, n, dtype, bias)
    _check_all(x, w, b, dtype, tf32, "fused")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype,tf32", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("m,k,n", [(113, 1023, 7), (1023, 7, 113), (256, 512, 384)], ids=str)
def test_cuda_unfused_fallback_path(m, k, n, dtype, tf32, monkeypatch):
    # The path taken when cuBLASLt has no fused-epilogue algorithm for a shape.
    monkeypatch.setenv("BIGMODEL_CUBLASLT_EPILOGUE", "0")
    x, w, b = _inputs(m, k, n, dtype)
    _check_all(x, w, b, dtype, tf32, "unfused")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("fused", ["1", "0"], ids=["fused", "unfused"])
def test_cuda_nan_and_inf_follow_torch(dtype, fused, monkeypatch):
    monkeypatch.setenv("BIGMODEL_CUBLASLT_EPILOGUE", fused)
    x, w, b = _inputs(300, 129, 200, dtype)
    x[17, 3] = float("nan")      # row 17 all NaN
    x[40, 0] = float("inf")      # row 40: +inf, -inf (ReLU 0) or, where w[:, 0] == 0, NaN
    w[5, 0] = 0.0
    w[6, 0] = -1.0
    w[11, 64] = float("nan")     # column 11 all NaN
    b[150] = float("nan")        # column 150 all NaN
    ref = ref_linear_relu(x.double(), w.double(), b.double())
    out, mask, grads = _check_all(x, w, b, dtype, False, f"nan/{fused}")
    assert torch.equal(torch.isnan(out), torch.isnan(ref))
    assert torch.equal(torch.isinf(out), torch.isinf(ref))
    assert torch.isnan(out[40, 5]) and out[40, 6] == 0
    # torch's ReLU backward lets the gradient through a NaN output.
    keep = _unpack(mask, 200)
    assert keep[torch.isnan(ref)].all()


@pytest.mark.cuda
def test_cuda_gradients_match_torch_autograd_with_nan():
    dtype = torch.float32
    x, w, b = _inputs(64, 32, 48, dtype)
    x[3, 5] = float("nan")
    w[2, 0] = float("nan")
    with _tf32(False):
        out, mask, grad, grads = _run(x, w, b)
    leaves = [t.double().requires_grad_() for t in (x, w, b)]
    ref_grads = torch.autograd.grad(ref_linear_relu(*leaves), leaves, grad.double())
    for name, g, r in zip(["grad_input", "grad_weight", "grad_bias"], grads, ref_grads):
        assert torch.equal(torch.isnan(g), torch.isnan(r)), name
        _close(g, r, dtype, False, 64, name)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_cuda_strided_inputs(dtype):
    base = torch.randn(300, 136, device="cuda", dtype=dtype) / 4
    cases = {
        "row stride > K (aligned)": base[:, :128],
        "row stride > K (unaligned)": base[:, 3:116],
        "transposed": torch.randn(120, 300, device="cuda", dtype=dtype).t() / 4,
        "every other column": base[:, ::2],
        "offset pointer": base[1:, 1:121],
    }
    for what, x in cases.items():
        k = x.shape[1]
        w = torch.randn(70, k, device="cuda", dtype=dtype) / 4
        b = torch.randn(70, device="cuda", dtype=dtype)
        _check_all(x, w, b, dtype, False, what)
        _check_all(x, w.t().contiguous().t(), b, dtype, False, what + ", transposed weight")


@pytest.mark.cuda
def test_cuda_degenerate_shapes():
    dtype = torch.float32
    # K == 0: out = relu(b), mask = b > 0, grad_bias = column sums where b > 0.
    x, w = torch.empty(5, 0, device="cuda"), torch.empty(3, 0, device="cuda")
    b = torch.tensor([1.0, -2.0, float("nan")], device="cuda")
    out, mask, grad, (gx, gw, gb) = _run(x, w, b)
    torch.testing.assert_close(out, torch.relu(b).expand(5, 3), equal_nan=True)
    assert _unpack(mask, 3).tolist() == [[True, False, True]] * 5
    assert gx.shape == (5, 0) and gw.shape == (3, 0)
    torch.testing.assert_close(gb, grad.sum(0) * torch.tensor([1.0, 0.0, 1.0], device="cuda"))
    # Empty batch: empty output, zero weight and bias gradients.
    x, w, b = _inputs(0, 9, 4, dtype)
    out, mask, grad, (gx, gw, gb) = _run(x, w, b)
    assert out.shape == (0, 4) and mask.shape == (0, 16)
    assert gx.shape == (0, 9) and not gw.any() and not gb.any()
    # No outputs.
    x, w, b = _inputs(6, 9, 0, dtype)
    out, mask, grad, (gx, gw, gb) = _run(x, w, b)
    assert out.shape == (6, 0) and mask.shape == (6, 0) and not gx.any() and gw.shape == (0, 9)


@pytest.mark.cuda
def test_cuda_only_requested_gradients():
    x, w, b = _inputs(33, 20, 17, torch.float16)
    out, mask = torch.ops.bigmodel.linear_relu_cublaslt(x, w, b)
    grad = torch.randn_like(out)
    full = torch.ops.bigmodel.linear_relu_cublaslt_backward(grad, mask, x, w, [True, True, True])
    for want in ([False, True, False], [True, False, False], [False, False, True], [True, False, True]):
        got = torch.ops.bigmodel.linear_relu_cublaslt_backward(grad, mask, x, w, want)
        for needed, g, f in zip(want, got, full):
            if needed:
                torch.testing.assert_close(g, f)
            else:
                assert g.numel() == 0


@pytest.mark.cuda
def test_cuda_bad_input_raises_clear_errors():
    x, w, b = _inputs(8, 16, 4, torch.float16)
    with pytest.raises(TypeError, match="Double"):
        torch.ops.bigmodel.linear_relu_cublaslt(x.double(), w.double(), None)
    with pytest.raises(ValueError, match=r"\[8, 16\].*\[4, 15\]"):
        torch.ops.bigmodel.linear_relu_cublaslt(x, w[:, :15], None)
    with pytest.raises(TypeError, match="bias dtype"):
        torch.ops.bigmodel.linear_relu_cublaslt(x, w, b.float())
    out, mask = torch.ops.bigmodel.linear_relu_cublaslt(x, w, b)
    with pytest.raises(ValueError, match="relu_mask"):
        torch.ops.bigmodel.linear_relu_cublaslt_backward(out, mask[:, :8], x, w, [True, True, True])
    with pytest.raises(ValueError, match="grad_output"):
        torch.ops.bigmodel.linear_relu_cublaslt_backward(out[:, :3], mask, x, w, [True, True, True])


@pytest.mark.cuda
def test_cuda_opcheck():
    samples = [
        _inputs(7, 5, 3, torch.float32),
        _inputs(113, 64, 130, torch.float16, bias=False),
        (torch.randn(40, 7, device="cuda").t(), torch.randn(3, 40, device="cuda"), torch.randn(3, device="cuda")),
        _inputs(0, 5, 3, torch.bfloat16),
    ]
    for x, w, b in samples:
        args = tuple(t.requires_grad_() if t is not None else None for t in (x, w, b))
        torch.library.opcheck(torch.ops.bigmodel.linear_relu_cublaslt.default, args)


@pytest.mark.cuda
def test_cuda_torch_compile_fullgraph_and_autocast():
    torch._dynamo.reset()
    x, w, b = _inputs(64, 32, 48, torch.float32)
    x.requires_grad_()

    def f(x, w, b):
        return lrc.linear_relu_cublaslt(x, w, b).sum()

    compiled = torch.compile(f, fullgraph=True)
    (gx,) = torch.autograd.grad(compiled(x, w, b), x)
    (gx_eager,) = torch.autograd.grad(f(x, w, b), x)
    torch.testing.assert_close(gx, gx_eager)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out, _ = torch.ops.bigmodel.linear_relu_cublaslt(x, w, b)
    assert out.dtype == torch.bfloat16
