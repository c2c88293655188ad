"""bigmodel.linear_relu, bigmodel::linear_relu and FusedLinearReLU, on every path CI runs (the C++
engine, the Triton kernels under the interpreter, the reference; see tests/paths.py), against the
float64 reference by the house rule (tests/tolerances.py). The tests marked cuda run on the H200
(bench/device_check.sh), with Triton and the cuBLASLt backend.
"""
import contextlib
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import bigmodel
from bigmodel.ops import _registry
from bigmodel.reference import ref_linear_relu
from error_table import check_row, rows_of
from far_apart import GAP, far_apart, small_footprint  # noqa: F401  (a fixture)
from paths import PATHS, deterministic, intel_cpu, on
from peers import assert_linear_relu_matches, linear_relu_grads

# Triton under the interpreter costs ~ms per tile step: keep its shapes small.
SHAPES = {"cpp": [(1, 1, 1), (7, 13, 5), (113, 64, 33), (1023, 130, 71), (64, 784, 512)],
          "triton": [(1, 7, 5), (7, 13, 1), (113, 40, 33), (65, 70, 66)]}


def _inputs(m, k, n, dtype, bias=True, requires_grad=True):
    # Scaled so fp16 stays well inside its range and ~half the outputs are positive.
    x = torch.randn(m, k, dtype=dtype) / max(k, 1)**0.25
    w = torch.randn(n, k, dtype=dtype) / max(k, 1)**0.25
    b = torch.randn(n, dtype=dtype) if bias else None
    for t in (x, w, b):
        if t is not None:
            t.requires_grad_(requires_grad)
    return x, w, b


def _check(path, x, w, b, what=""):
    """Forward and every gradient on ``path`` by the house rule."""
    with on(path):
        y = bigmodel.linear_relu(x, w, b)
        grad = torch.randn_like(y)
        leaves = {n: t for n, t in zip("xwb", (x, w, b)) if t is not None}
        grads = dict(zip(leaves, torch.autograd.grad(y, list(leaves.values()), grad)))
    assert_linear_relu_matches(y, x, w, b, grad, grads, f"{path} {what}")
    return y, grads


@pytest.mark.parametrize("path,dtype", PATHS, ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_matches_float64_reference(path, dtype, bias):
    for m, k, n in SHAPES[path]:
        _check(path, *_inputs(m, k, n, dtype, bias), what=f"{(m, k, n)}")


@pytest.mark.parametrize("path,dtype", PATHS + [("reference", torch.float32)], ids=str)
def test_leading_dims_and_strides(path, dtype):
    # 3-D input, 1-D input, and inputs that are not contiguous (transposed and sliced).
    _, w, b = _inputs(1, 33, 17, dtype)
    cases = [
        torch.randn(2, 5, 33, dtype=dtype).requires_grad_(),
        torch.randn(33, dtype=dtype, requires_grad=True),
        torch.randn(33, 9, dtype=dtype).t().requires_grad_(),                 # transposed
        torch.randn(9, 66, dtype=dtype)[:, ::2].requires_grad_(),             # strided columns
        torch.randn(4, 33, 3, dtype=dtype).transpose(1, 2).requires_grad_(),  # 3-D, permuted
    ]
    for x in cases:
        _check(path, x, w, b, f"x {tuple(x.shape)} strides {x.stride()}")
    wt = torch.randn(33, 17, dtype=dtype).t().requires_grad_()  # non-contiguous weight
    _check(path, cases[0], wt, b, "transposed weight")
    bs = torch.randn(34, dtype=dtype)[::2].requires_grad_()     # strided bias
    _check(path, cases[0], w, bs, "strided bias")


@pytest.mark.parametrize("path,dtype", PATHS + [("reference", torch.float32)], ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_empty_in_features_gives_relu_of_the_bias(path, dtype, bias):
    """K = 0, as torch: the output is relu(bias) on every row (zeros without a bias), the input
    and weight gradients are empty and the bias gradient sums the rows the ReLU lets through."""
    x = torch.randn(3, 4, 0, dtype=dtype, requires_grad=True)
    w = torch.randn(5, 0, dtype=dtype, requires_grad=True)
    b = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0], dtype=dtype, requires_grad=True) if bias else None
    with on(path):
        y = bigmodel.linear_relu(x, w, b)
        grad = torch.randn_like(y)
        grads = torch.autograd.grad(y, [t for t in (x, w, b) if t is not None], grad)
    want = torch.relu(b.detach()).expand(3, 4, 5) if bias else torch.zeros(3, 4, 5, dtype=dtype)
    assert y.shape == (3, 4, 5) and torch.equal(y, want)
    assert grads[0].shape == x.shape and grads[1].shape == w.shape
    if bias:
        torch.testing.assert_close(grads[2], (grad * (b.detach() > 0)).sum((0, 1)))


@pytest.mark.parametrize("path,dtype", PATHS + [("reference", torch.float32)], ids=str)
def test_empty_batch(path, dtype):
    x, w, b = _inputs(0, 12, 5, dtype)
    with on(path):
        y = bigmodel.linear_relu(x.reshape(0, 0, 12), w, b)
        assert y.shape == (0, 0, 5)
        y.sum().backward()
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))


@pytest.mark.parametrize("path,dtype", PATHS, ids=str)
def test_nan_reaches_exactly_its_row_and_column(path, dtype):
    m, k, n = (150, 40, 70) if path == "cpp" else (40, 20, 36)  # rows span several blocks/tiles
    x, w, b = (t.detach() for t in _inputs(m, k, n, dtype))
    x[3, 5] = x[m - 3, 7] = float("nan")
    w[2, 0] = float("nan")
    b[n - 2] = float("nan")
    with on(path):
        y = bigmodel.linear_relu(x, w, b)
    expect = torch.zeros(m, n, dtype=torch.bool)
    expect[[3, m - 3]] = True
    expect[:, [2, n - 2]] = True
    # tl.maximum(x, 0), std::max or cuBLASLt's ReLU would turn these into 0.
    assert torch.equal(torch.isnan(y), expect)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, in the interpreter
@pytest.mark.parametrize("path,dtype", PATHS, ids=str)
def test_infinities_match_the_reference(path, dtype):
    """inf in an input row gives inf (or NaN where inf * 0 or inf - inf) exactly where float64 does."""
    x, w = torch.randn(30, 16).to(dtype), torch.randn(12, 16).to(dtype)
    x[4, 2], x[7, 1], w[5, 0] = float("inf"), float("-inf"), float("inf")
    w[9, 2] = 0.0  # inf * 0 = NaN in row 4, column 9
    with on(path):
        y = bigmodel.linear_relu(x, w)
    ref = ref_linear_relu(x.double(), w.double())
    assert torch.equal(y.isnan(), ref.isnan()) and torch.equal(y.isinf(), ref.isinf())
    assert y[4, 9].isnan()


@pytest.mark.parametrize("path,dtype", PATHS, ids=str)
def test_inputs_scaled_to_1e3(path, dtype):
    k = 64
    s = 30.0 if dtype == torch.float16 else 1e3  # 1e6 x sqrt(k) does not fit fp16: just fits
    x, w, b = (s * torch.randn(9, k)).to(dtype), (s * torch.randn(7, k)).to(dtype), torch.randn(7).to(dtype)
    with on(path):
        y = bigmodel.linear_relu(x, w, b)
    assert torch.isfinite(y).all()
    assert_linear_relu_matches(y, x, w, b, what=f"{path} scaled by {s}")


@pytest.mark.parametrize("path", ["cpp", "triton"])
def test_fp16_does_not_overflow_where_torch_does_not(path):
    """Partial sums past 65504 whose total fits fp16: torch accumulates fp16 GEMMs in fp32, so
    must we (an fp16 accumulator would give inf)."""
    k = 256
    x = torch.full((4, k), 600.0, dtype=torch.float16)
    x[:, k // 2:] = -600.0      # first half sums to 76800 > 65504, the whole row to 0
    x[:, -1] = -500.0           # ... to 100
    w = torch.ones(3, k, dtype=torch.float16)
    theirs = F.relu(F.linear(x, w))
    assert torch.isfinite(theirs).all()
    with on(path):
        y = bigmodel.linear_relu(x, w)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, theirs)


@pytest.mark.parametrize("path", ["cpp", "triton"])
def test_relu_gradient_mask_matches_torch(path):
    # Exactly-zero pre-activations (bias cancels) and negative ones get no gradient, as in torch.
    x = torch.zeros(4, 3, requires_grad=True)
    w = torch.randn(5, 3, requires_grad=True)
    b = torch.tensor([0.0, -1.0, 2.0, 0.5, -0.5], requires_grad=True)
    with on(path):
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
    torch.testing.assert_close(gw, linear_relu_grads(y, torch.ones_like(y), x, w, b)[1])


@pytest.mark.parametrize("path,dtype", [("cpp", torch.float32), ("cpp", torch.bfloat16),
                                        ("triton", torch.float32), ("triton", torch.float16)], ids=str)
def test_bitwise_deterministic_run_to_run(path, dtype):
    m, k, n = (700, 130, 90) if path == "cpp" else (40, 36, 33)  # C++: several row blocks, all threads
    x, w, b = _inputs(m, k, n, dtype)
    grad = torch.randn(m, n).to(dtype)

    def run():
        with on(path):
            y = bigmodel.linear_relu(x, w, b)
            return y, *torch.autograd.grad(y, (x, w, b), grad)

    with deterministic():
        first, second = run(), run()
    assert all(torch.equal(a, c) for a, c in zip(first, second))


def test_fp32_without_onednn_takes_the_blocked_path():
    """fp32 goes to oneDNN where the plan says so; BIGMODEL_NO_ONEDNN=1 forces MKL for every
    product (as fp64 and Intel CPUs run them): this file's fp32 accuracy tests, rerun."""
    env = dict(os.environ, BIGMODEL_NO_ONEDNN="1")
    tests = os.path.abspath(__file__)
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", tests,
                          "-k", "matches_float64_reference and cpp and float32"],
                         cwd=os.path.dirname(os.path.dirname(tests)), env=env, capture_output=True, text=True)
    assert run.returncode == 0 and " passed" in run.stdout, run.stdout[-3000:] + run.stderr[-2000:]


# ---------------------------------------------------------------------------------------------
# The C++ engine's GEMM plans (csrc/cpu/linear_relu.cpp): results that do not depend on the
# thread count on the engine's own plans (oneDNN at AVX512, per block from 32 MB on AMD;
# elsewhere the engine makes eager's own multithreaded MKL call, which is as reproducible as
# eager: run to run, for one thread count), and half /
# bfloat16 computed in float and rounded once. tests/test_cpu_levels.py runs them again at
# every CPU level below the machine's own.

# (M, K, N) across the plans of csrc/cpu/linear_relu.cpp's plan_gemms at AVX2 and AVX512: all
# three products on oneDNN (K >= 512); a small K (dW on MKL); dW on oneDNN at AVX512 only
# (K = 300), its dZ^T from transposed_copy with row and column edges (M, N not multiples of 16),
# and over M = 5000 in two chunks (4096 + 904 rows, summed in order);
# N = 10 at M < 1024 (the narrow kernels) and at M >= 1024; M >= 1024 (oneDNN's forward and dX at
# AVX2); a product below oneDNN's threshold (torch's own MKL call); M <= 1024 and K >= 512 with
# both products on MKL (Intel, or AMD at AVX2), which on two threads run side by side, one
# single-threaded call each (linear_relu.cpp's side_by_side_applies).
PLAN_SHAPES = [(1024, 784, 512), (300, 100, 256), (513, 300, 129), (4096, 256, 10), (1100, 784, 10),
               (600, 784, 10), (64, 40, 12), (5000, 300, 200), (515, 600, 129)]


def _engine_grads(x, w, b, g, fn=None):
    """Output and (dx, dw, db) of the C++ engine's linear_relu, or of ``fn``."""
    with bigmodel.use_backend("cpp"):
        y = fn(x, w, b) if fn else bigmodel.linear_relu(x, w, b)
        return (y,) + torch.autograd.grad(y, (x, w, b), g)


def _eager(x, w, b):
    return F.relu(F.linear(x, w, b))


def _plan_inputs(M, K, N, dtype=torch.float32):
    x = torch.randn(M, K).to(dtype).requires_grad_()
    w = (torch.randn(N, K) * K ** -0.5).to(dtype).requires_grad_()
    b = (torch.randn(N) * 0.1).to(dtype).requires_grad_()
    g = torch.randn(M, N).to(dtype)
    return x, w, b, g


def _with_threads(n, fn):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(old)


def _own_plan(M, K, N):
    """The results the engine's own plans fix by the shape alone, whatever the thread count
    (mirrors plan_gemms): those on oneDNN (every one for tensors of 32 MB and more on oneDNN's
    blocks), the narrow kernels', and db everywhere; the products left to MKL are torch's own
    calls, reproducible as eager's are."""
    level = torch.backends.cpu.get_cpu_capability()
    elt, flops = 4, 2 * M * N * K
    small = M * max(N, K) * elt < 32 << 20
    avx512, avx2 = level.startswith("AVX512"), level == "AVX2"
    own = set()
    if not intel_cpu() and (avx512 and flops >= 2e6 or avx2 and flops >= 4e6):
        rows = avx512 or M >= 1024
        if M * N * elt < 32 << 20 and (rows or N <= 16):
            own.add("y")
        if small and (avx512 or (rows and N > 16)):
            own.add("dx")
        if small and rows and (avx512 or M <= 4096) and K >= (256 if avx512 else 512):
            own.add("dw")
    # A narrow layer (csrc/cpu/linear_narrow.h) is the engine's own dot products, forward and
    # backward.
    if _narrow_applies(K, N):
        own.add("y")
        if M * K * elt < 32 << 20:
            own |= {"dx", "dw"}
    # db (the ReLU's dz summed in fixed chunks of rows as it is written) on every plan.
    if small:
        return own | {"db"}
    # 32 MB and more: oneDNN block by block (AMD at AVX512, K and N >= 256), else whole tensors,
    # MKL's calls as below 32 MB.
    return {"y", "dx", "dw", "db"} if not intel_cpu() and avx512 and min(K, N) >= 256 else {"db"}


def _narrow_applies(K, N, dtype=torch.float32):
    """Mirrors csrc/cpu/linear_narrow.h's narrow_applies: an fp32 forward with N <= 11 at AVX2,
    <= 14 at AVX512, K >= 16."""
    level = torch.backends.cpu.get_cpu_capability()
    max_n = 14 if level.startswith("AVX512") else 11 if level == "AVX2" else 0
    return dtype == torch.float32 and 0 < N <= max_n and K >= 16


@pytest.mark.parametrize("shape", PLAN_SHAPES, ids=str)
def test_cpp_plans_match_float64(shape):
    """Each plan's fp32 output and gradients under the house rule against float64, on two
    threads (the count some plans depend on)."""
    x, w, b, g = _plan_inputs(*shape)
    y, dx, dw, db = _with_threads(2, lambda: _engine_grads(x, w, b, g))
    assert_linear_relu_matches(y.detach(), x, w, b, g, {"x": dx, "w": dw, "b": db}, f"plan {shape}")


# Tensors of 32 MB and more: whole tensors from the output cache's huge pages on MKL (K = N = 128,
# and the second shape on Intel or below AVX512), oneDNN per block of at most 4096 rows on AMD at
# AVX512 (both dimensions >= 256; odd M, K, N).
BLOCKED_SHAPES = [pytest.param((65536, 128, 128), id="blocked-32MB"),
                  pytest.param((8200, 260, 1030), id="blocked-onednn-33MB")]


@pytest.mark.parametrize("shape", PLAN_SHAPES + BLOCKED_SHAPES, ids=str)
def test_cpp_thread_count_does_not_change_results(shape):
    own = _own_plan(*shape)
    x, w, b, g = _plan_inputs(*shape)
    results = [_with_threads(n, lambda: _engine_grads(x, w, b, g)) for n in (1, 2, 3)]
    for n, other in zip((2, 3), results[1:]):
        for name, a, c in zip(("y", "dx", "dw", "db"), results[0], other):
            if name in own:
                assert torch.equal(a, c), f"{name} with {n} threads differs from 1 thread at {shape}"


@pytest.mark.parametrize("M,K,N", [(1, 16, 1), (7, 17, 3), (33, 100, 10), (130, 31, 11), (64, 256, 14),
                                   (5, 784, 5), (129, 255, 13), (700, 77, 10), (1024, 256, 10)], ids=str)
def test_cpp_narrow_layer_matches_float64(M, K, N):
    """The narrow layer (N up to 11 / 14, its own dot products with a zero-filled tail of K, and
    its own dX and dW kernels: column tails, row tails, dW summed in spans of 256 rows): odd M, K
    and N, a strided input, NaN in one input row reaching exactly that output row. Checked at
    whatever level runs (at DEFAULT these are MKL's GEMMs)."""
    x, w, b, g = _plan_inputs(M + 1, K + 3, N)
    x = x.detach()[1:, 2:-1].requires_grad_()  # rows strided by K + 3: a view, not a copy
    w = w.detach()[:, 2:-1].contiguous().requires_grad_()
    g = g[1:]
    y, dx, dw, db = _engine_grads(x, w, b, g)
    assert_linear_relu_matches(y.detach(), x, w, b, g, {"x": dx, "w": dw, "b": db}, f"narrow {M}x{K}->{N}")
    xn = x.detach().clone()
    xn[M // 2, K // 3] = float("nan")
    with bigmodel.use_backend("cpp"):
        yn = bigmodel.linear_relu(xn, w.detach(), b.detach())
    rows = torch.isnan(yn).any(1)
    assert rows.nonzero().flatten().tolist() == [M // 2] and torch.isnan(yn[M // 2]).all()
    # Backward: NaN exactly where eager's is (dW's column K // 3, from 0 * NaN too).
    ours = _engine_grads(xn.requires_grad_(), w, b, g)
    theirs = _engine_grads(xn, w, b, g, fn=_eager)
    for name, a, e in zip(("dx", "dw", "db"), ours[1:], theirs[1:]):
        assert torch.equal(torch.isnan(a), torch.isnan(e)), f"NaN in {name} differs from eager's"
    assert torch.isnan(ours[2][:, K // 3]).all()


@pytest.mark.parametrize("shape", BLOCKED_SHAPES)
def test_cpp_blocked_32mb_matches_float64(shape):
    """Tensors of 32 MB and more: whole tensors in huge pages on MKL's calls, or on oneDNN per
    block (dX copied into place, dW added block by block): output and every gradient against
    float64."""
    x, w, b, g = _plan_inputs(*shape)
    y, dx, dw, db = _engine_grads(x, w, b, g)
    assert_linear_relu_matches(y.detach(), x, w, b, g, {"x": dx, "w": dw, "b": db}, f"blocked {shape}")


@pytest.mark.parametrize("M", [8704, 83], ids=["34MB-huge-pages", "332KB"])
def test_cpp_reused_outputs_never_alias_live_ones(M):
    """Outputs of 256 KB and more come from a cache of freed blocks (csrc/cpu/output_cache.cpp),
    those of 32 MB and more in huge pages: a block goes back to a new output only once its tensor
    is gone, and the new output is written in full. K = 1 keeps the GEMMs cheap; each output
    (M x 1024 floats) is of a size no other test makes (the cache hands out blocks of the exact
    size asked for, in 4 KB pages)."""
    N = 1024
    op = torch.ops.bigmodel.linear_relu.default
    w, b = torch.randn(N, 1), torch.randn(N)
    xs = [torch.randn(M, 1) for _ in range(4)]
    want = [ref_linear_relu(x.double(), w.double(), b.double()).float() for x in xs]
    first, second = op(xs[0], w, b), op(xs[1], w, b)
    assert first.data_ptr() != second.data_ptr()
    align = (2 << 20) if M * N * 4 >= 32 << 20 else 4096  # the cache's blocks, not torch's allocator's
    assert first.data_ptr() % align == 0 and second.data_ptr() % align == 0
    freed = first.data_ptr()
    del first
    third = op(xs[2], w, b)  # may take the freed block: must not touch `second`
    fourth = op(xs[3], w, b)
    ptrs = {second.data_ptr(), third.data_ptr(), fourth.data_ptr()}
    assert len(ptrs) == 3, "two live outputs share a block"
    for got, ref in ((second, want[1]), (third, want[2]), (fourth, want[3])):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert freed in ptrs, "the freed block was not reused (the cache is off?)"


def _half_ulp(ref, dtype):
    """Half the spacing of ``dtype`` at each value of ref (float64)."""
    mant = {torch.bfloat16: 7, torch.float16: 10}[dtype]
    exp = torch.floor(torch.log2(ref.abs().clamp_min(torch.finfo(dtype).tiny)))
    return torch.exp2(exp - mant - 1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", PLAN_SHAPES[:3], ids=str)
def test_cpp_low_precision_is_rounded_once(dtype, shape):
    """Half and bfloat16 are computed in float (or by a native GEMM that accumulates in float)
    and rounded once: every output and gradient is within half a unit in the last place of the
    float64 result on the same rounded inputs, plus a few times the largest error float32 makes
    on them (a sum in another order can land on the other side of a rounding boundary). A second
    rounding (e.g. of the GEMM's output before the bias) would add up to another half unit."""
    x, w, b, g = _plan_inputs(*shape, dtype=dtype)
    ours = _engine_grads(x, w, b, g)

    def exact(t):
        return [a.detach().to(t).requires_grad_() for a in (x, w, b)] + [g.to(t)]

    ref = _engine_grads(*exact(torch.float64), fn=_eager)
    f32 = _engine_grads(*exact(torch.float32), fn=_eager)
    # Where a pre-activation lies within float32's error of 0, the ReLU's mask can fall either
    # way (about one element in 10^6 here): that gradient row of dx and feature of dw and db then
    # differ by a whole term, not by a rounding. Those are left out (a handful at most).
    flipped = (ours[0] > 0) != (ref[0] > 0)
    assert flipped.sum() <= 4, f"{flipped.sum().item()} ReLU masks differ from float64's at {shape}"
    keep = {"y": torch.ones_like(flipped), "dx": ~flipped.any(1, keepdim=True).expand(-1, shape[1]),
            "dw": ~flipped.any(0).unsqueeze(1).expand(-1, shape[1]), "db": ~flipped.any(0)}
    for name, o, r, f in zip(("y", "dx", "dw", "db"), ours, ref, f32):
        assert o.dtype == dtype
        excess = (o.double() - r).abs() - _half_ulp(r, dtype) - 4 * (f.double() - r).abs().max()
        excess = excess[keep[name]]
        assert excess.max() <= 1e-30, f"{name}: {excess.max().item():.3g} beyond one rounding at {shape}"


# ---------------------------------------------------------------------------------------------
# Offsets past 2**31 elements (tests/far_apart.py): row and column offsets of x, W, grad and the
# saved output, forward and backward, are int64 in every kernel.


def test_interpreter_reproduces_int32_wraparound(small_footprint):
    """The control for the test below: a kernel that multiplies an int32 row index by an int32
    stride reads the wrong element (it wraps), so a Triton kernel without int64 offsets would fail
    it rather than pass by luck."""
    import triton
    import triton.language as tl

    @triton.jit
    def copy_rows_int32(x_ptr, y_ptr, stride, K, BLOCK: tl.constexpr):
        r = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        v = tl.load(x_ptr + r * stride + offs, mask=offs < K)  # r * stride in int32: wraps
        tl.store(y_ptr + r * K + offs, v, mask=offs < K)

    rows = torch.randn(3, 8)
    x = far_apart(rows, 0, GAP)
    y = torch.empty(3, 8)
    copy_rows_int32[(3,)](x, y, GAP, 8, BLOCK=8)
    assert torch.equal(y[:2], rows[:2])
    assert not torch.equal(y[2], rows[2]) and not y[2].any()  # read 2**32 elements too early: zeros


@pytest.mark.parametrize("path", ["cpp", "triton"])
@pytest.mark.parametrize("far", ["x-rows", "x-cols", "w-rows"])
def test_offsets_past_2_31(path, far, small_footprint):
    """Forward and backward reading rows (or columns) 2**31 elements apart; the backward op is
    called with grad and the saved output far apart too."""
    torch.manual_seed(0)
    m, k, n = (3, 40, 5) if far != "x-cols" else (6, 3, 5)
    x0, w0, b0 = torch.randn(m, k), torch.randn(n, k), torch.randn(n)
    g0 = torch.randn(m, n)
    x = far_apart(x0, 0, GAP) if far == "x-rows" else far_apart(x0, 1, GAP) if far == "x-cols" else x0
    w = far_apart(torch.randn(3, k), 0, GAP) if far == "w-rows" else w0
    if far == "w-rows":
        w0, b0, g0 = w.clone(), b0[:3], g0[:, :3]
    with on(path):
        y = bigmodel.linear_relu(x, w, b0)
        g = far_apart(g0, 0, GAP) if m >= 3 else g0
        yv = far_apart(y, 0, GAP) if m >= 3 else y
        got = torch.ops.bigmodel.linear_relu_backward(g, yv, x, w, [True, True, True])
    assert_linear_relu_matches(y, x0, w0, b0, g0, dict(zip("xwb", got)), f"{path} {far}")


# ---------------------------------------------------------------------------------------------
# The registered op: opcheck, gradcheck, torch.compile, autocast.


def _opcheck_samples():
    def leaf(*s, dtype=torch.float32, grad=False):
        return torch.randn(*s, dtype=dtype).requires_grad_(grad)

    return [
        (leaf(7, 5), leaf(3, 5), leaf(3)),                                   # contiguous
        (leaf(5, 7).t(), leaf(5, 3).t(), torch.randn(6)[::2]),               # non-contiguous
        (leaf(0, 5), leaf(3, 5), leaf(3)),                                   # empty batch
        (leaf(7, 0), leaf(3, 0), None),                                      # K = 0
        (leaf(7, 5, grad=True), leaf(3, 5, grad=True), leaf(3, grad=True)),  # requires_grad
        (leaf(4, 6, dtype=torch.float64, grad=True), leaf(2, 6, dtype=torch.float64, grad=True), None),
    ]


@pytest.mark.parametrize("path", ["cpp", "triton"])
@pytest.mark.parametrize("i", range(len(_opcheck_samples())))
def test_opcheck(path, i):
    x, w, b = _opcheck_samples()[i]
    if path == "triton" and x.dtype == torch.float64:
        return  # the interpreter has no fp64 dot
    with on(path):
        torch.library.opcheck(torch.ops.bigmodel.linear_relu.default, (x, w, b))
        y = torch.ops.bigmodel.linear_relu(x.detach(), w.detach(), b.detach() if b is not None else None)
        g = torch.randn_like(y)
        for mask in ([True, True, b is not None], [True, False, False], [False, True, False]):
            torch.library.opcheck(torch.ops.bigmodel.linear_relu_backward.default,
                                  (g, y, x.detach(), w.detach(), mask))


def test_gradcheck_op_and_backward_op():
    """gradcheck of the forward op runs its registered autograd formula, i.e. the backward op,
    against finite differences of the forward; then the backward op alone for every output_mask
    against the float64 vector-Jacobian product of the reference."""
    x, w, b = (torch.randn(*s, dtype=torch.float64, requires_grad=True) for s in ((6, 5), (4, 5), (4,)))
    op = torch.ops.bigmodel.linear_relu
    assert torch.autograd.gradcheck(op, (x, w, b))
    assert torch.autograd.gradcheck(lambda x, w: op(x, w, None), (x.detach().t().contiguous().t()
                                                                   .requires_grad_(), w))
    assert torch.autograd.gradcheck(bigmodel.linear_relu, (x.unsqueeze(0), w, b))
    y = op(x, w, b).detach()
    g = torch.randn_like(y)
    _, vjp = torch.func.vjp(ref_linear_relu, x.detach(), w.detach(), b.detach())
    want = vjp(g)
    for mask in ([True, True, True], [True, False, False], [False, True, False], [False, False, True]):
        got = torch.ops.bigmodel.linear_relu_backward(g, y, x.detach(), w.detach(), mask)
        for need, ours, ref in zip(mask, got, want):
            if need:
                torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
            else:
                assert ours.numel() == 0


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


def test_autocast_cpu_is_the_registered_kernel():
    """Autocast lives in one place, the op's registered autocast kernel: the public function and
    the op agree, mixed input dtypes are accepted as F.linear accepts them, and the result is
    what F.linear gives under autocast."""
    x, w, b = _inputs(5, 8, 3, torch.float32, requires_grad=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = bigmodel.linear_relu(x, w, b)
        y_op = torch.ops.bigmodel.linear_relu(x, w, b)
        y_mixed = bigmodel.linear_relu(x.bfloat16(), w, b.double())
        ref = F.relu(F.linear(x, w, b))
    assert y.dtype == y_op.dtype == y_mixed.dtype == ref.dtype == torch.bfloat16
    assert torch.equal(y, y_op) and torch.equal(y, y_mixed)
    assert_linear_relu_matches(y, x.bfloat16(), w.bfloat16(), b.bfloat16(), what="autocast")


# ---------------------------------------------------------------------------------------------
# Errors (docs/errors.md).

LR = bigmodel.linear_relu


def _t(*shape, **kw):
    return torch.randn(*shape, **kw)


def _in(name, fn, *args):
    with bigmodel.use_backend(name):
        return fn(*args)


# id -> (call(monkeypatch), the argument the message must name or None, needs CUDA)
ERROR_CASES = {
    "lr-type": (lambda mp: LR(_t(3, 4), _t(5, 4), [0.0] * 5), "bias", False),
    "lr-weight-none": (lambda mp: LR(_t(3, 4), None), "weight", False),
    "lr-0d": (lambda mp: LR(torch.tensor(1.0), _t(5, 1)), "input", False),
    "lr-weight-dim": (lambda mp: LR(_t(3, 4), _t(5, 4, 1)), "weight", False),
    "lr-in-features": (lambda mp: LR(_t(3, 4), _t(5, 6)), "input", False),
    "lr-bias-shape": (lambda mp: LR(_t(3, 4), _t(5, 4), _t(1, 5)), "bias", False),
    "lr-device": (lambda mp: LR(_t(3, 4), _t(5, 4, device="meta")), "weight", False),
    "lr-dtype": (lambda mp: LR(_t(3, 4), _t(5, 4), _t(5, dtype=torch.float64)), "bias", False),
    "lr-not-float": (lambda mp: LR(torch.ones(3, 4, dtype=torch.int32), torch.ones(5, 4, dtype=torch.int32)),
                     "input", False),
    "lr-fp64-cuda": (lambda mp: LR(_t(3, 4, dtype=torch.float64, device="cuda"),
                                   _t(5, 4, dtype=torch.float64, device="cuda")), "dtype", True),
    "lr-triton-cpu": (lambda mp: _in("triton", LR, _t(3, 4), _t(5, 4)), "triton", False),
    "lr-cpp-cuda": (lambda mp: _in("cpp", LR, _t(3, 4, device="cuda"), _t(5, 4, device="cuda")), "cpp", True),
    "lr-not-built": (lambda mp: (mp.setattr(_registry, "_C", None), LR(_t(3, 4), _t(5, 4))), None, False),
    "flr-in-features": (lambda mp: bigmodel.nn.FusedLinearReLU(4, 3)(_t(2, 5)), "input", False),
    "flr-dtype": (lambda mp: bigmodel.nn.FusedLinearReLU(4, 3)(_t(2, 4, dtype=torch.float64)), "weight", False),
}


def test_error_rows_are_all_covered():
    assert set(ERROR_CASES) == set(rows_of("lr", "flr"))


@pytest.mark.parametrize("ident", sorted(ERROR_CASES))
def test_error_row(ident, monkeypatch):
    check_row(ident, ERROR_CASES[ident], monkeypatch)


@pytest.mark.parametrize(
    "make,error,words",
    [
        (lambda: (torch.randn(3, 5), torch.randn(4, 6), None), ValueError, ["(3, 5)", "(4, 6)"]),
        (lambda: (torch.randn(3, 5), torch.randn(4, 5), torch.randn(3)), ValueError, ["bias", "(3,)"]),
        (lambda: (torch.randn(3, 5), torch.randn(4, 5, dtype=torch.float64), None), TypeError, ["float64"]),
    ],
)
def test_bad_input_names_the_shapes_and_dtypes(make, error, words):
    x, w, b = make()
    with pytest.raises(error) as info:
        bigmodel.linear_relu(x, w, b)
    for word in words:
        assert word in str(info.value)


def test_direct_op_calls_check_their_inputs():
    """The registered op checks what the public function checks, so a direct call with a
    mismatched weight is an error, not an out-of-bounds read."""
    for path in ("cpp", "triton"):
        with on(path), pytest.raises((RuntimeError, ValueError), match=r"weight"):
            torch.ops.bigmodel.linear_relu(torch.randn(3, 5), torch.randn(4, 6), None)


# ---------------------------------------------------------------------------------------------
# FusedLinearReLU.


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


# ---------------------------------------------------------------------------------------------
# The H200 (bench/device_check.sh): real sizes, both CUDA backends (Triton and cuBLASLt).

CUDA_BACKENDS = ["auto", "cublaslt"]


@contextlib.contextmanager
def _tf32(enabled):
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def _cuda(*tensors):
    return [t.detach().cuda().requires_grad_() if t is not None else None for t in tensors]


@pytest.mark.cuda
@pytest.mark.parametrize("name", CUDA_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_cuda_matches_float64_reference(name, dtype, bias):
    """IEEE fp32 and 16-bit by the house rule, at the odd sizes in every position and real ones."""
    with _tf32(False):
        for m, k, n in [(1, 1, 1), (7, 7, 7), (1, 113, 1023), (113, 1023, 7), (1023, 7, 113),
                        (1023, 784, 512), (4096, 256, 1024)]:
            x, w, b = _cuda(*_inputs(m, k, n, dtype, bias))
            _check(name, x, w, b, f"{(m, k, n)}")
            xt = x.detach().t().contiguous().t().requires_grad_()
            _check(name, xt, w, b, f"{(m, k, n)} transposed x")


@pytest.mark.cuda
@pytest.mark.parametrize("name", CUDA_BACKENDS)
def test_cuda_tf32_is_within_tf32_rounding(name):
    """TF32 rounds the inputs to 10 mantissa bits: torch's own TF32 GEMM is the peer."""
    with _tf32(True):
        x, w, b = _cuda(*_inputs(1023, 784, 512, torch.float32))
        with bigmodel.use_backend(name):
            y = bigmodel.linear_relu(x, w, b)
        assert_linear_relu_matches(y, x, w, b, what=f"{name} tf32")


@pytest.mark.cuda
@pytest.mark.parametrize("name", CUDA_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_cuda_nan_inf_and_degenerate_shapes(name, dtype, monkeypatch):
    x, w, b = (t.detach().cuda() for t in _inputs(300, 129, 200, dtype))
    x[17, 3] = float("nan")      # row 17 all NaN
    x[40, 0] = float("inf")      # row 40: +inf, -inf (ReLU 0) or, where w[:, 0] == 0, NaN
    w[5, 0], w[6, 0] = 0.0, -1.0
    w[11, 64] = float("nan")     # column 11 all NaN
    b[150] = float("nan")        # column 150 all NaN
    with bigmodel.use_backend(name):
        y = bigmodel.linear_relu(x, w, b)
        ref = ref_linear_relu(x.double(), w.double(), b.double())
        assert torch.equal(torch.isnan(y), torch.isnan(ref)) and torch.equal(torch.isinf(y), torch.isinf(ref))
        assert torch.isnan(y[40, 5]) and y[40, 6] == 0
        for m, k, n in [(0, 9, 4), (6, 9, 0), (5, 0, 3)]:
            xs, ws, bs = _cuda(*_inputs(m, k, n, dtype))
            out = bigmodel.linear_relu(xs, ws, bs)
            assert out.shape == (m, n)
            grads = torch.autograd.grad(out.sum(), (xs, ws, bs))
            assert [g.shape for g in grads] == [xs.shape, ws.shape, bs.shape]


@pytest.mark.cuda
def test_cuda_cublaslt_unfused_fallback(monkeypatch):
    """The path cuBLASLt takes when it has no fused-epilogue algorithm for a shape."""
    monkeypatch.setenv("BIGMODEL_CUBLASLT_EPILOGUE", "0")
    with _tf32(False):
        for m, k, n in [(113, 1023, 7), (1023, 7, 113), (256, 512, 384)]:
            _check("cublaslt", *_cuda(*_inputs(m, k, n, torch.float16)), what=f"unfused {(m, k, n)}")


@pytest.mark.cuda
@pytest.mark.parametrize("name", CUDA_BACKENDS)
def test_cuda_opcheck_and_compile(name):
    torch._dynamo.reset()
    with bigmodel.use_backend(name):
        for x, w, b in [_cuda(*_inputs(7, 5, 3, torch.float32)), _cuda(*_inputs(113, 64, 130, torch.float16)),
                        _cuda(*_inputs(0, 5, 3, torch.bfloat16))]:
            torch.library.opcheck(torch.ops.bigmodel.linear_relu.default, (x, w, b))
        x, w, b = _cuda(*_inputs(64, 32, 48, torch.float32))
        compiled = torch.compile(lambda x, w, b: bigmodel.linear_relu(x, w, b).sum(), fullgraph=True)
        (gx,) = torch.autograd.grad(compiled(x, w, b), x)
        (gx_eager,) = torch.autograd.grad(bigmodel.linear_relu(x, w, b).sum(), x)
        torch.testing.assert_close(gx, gx_eager)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            assert bigmodel.linear_relu(x, w, b).dtype == torch.bfloat16


@pytest.mark.cuda
def test_cuda_tensor_past_2_31_elements():
    """x (M, K) with M * K > 2**31: row offsets m * K of the last rows pass int32."""
    k = n = 512
    m = 2**31 // k + 3
    x = torch.empty(m, k, device="cuda", dtype=torch.float16).normal_().mul_(k ** -0.25).requires_grad_()
    w = (torch.randn(n, k, device="cuda") * k ** -0.25).half().requires_grad_()
    b = torch.randn(n, device="cuda").half().requires_grad_()
    y = bigmodel.linear_relu(x, w, b)
    grad = torch.zeros_like(y)
    tail = slice(m - 5, m)
    grad[tail] = torch.randn(5, n, device="cuda").half()
    dx, dw, db = torch.autograd.grad(y, (x, w, b), grad)
    assert not dx[: m - 5].any()
    xt = x[tail].detach()
    assert_linear_relu_matches(y[tail].detach(), xt, w, b, grad[tail], dict(x=dx[tail]), "last rows")
    _, gw, gb = linear_relu_grads(y[tail], grad[tail], xt, w, b)
    torch.testing.assert_close(dw.double(), gw, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(db.double(), gb, atol=2e-2, rtol=2e-2)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_cuda_bitwise_deterministic(dtype):
    x, w, b = _cuda(*(t.to(dtype) for t in (torch.randn(1000, 300), torch.randn(200, 300), torch.randn(200))))
    grad = torch.randn(1000, 200, device="cuda").to(dtype)

    def run():
        y = bigmodel.linear_relu(x, w, b)
        return y, *torch.autograd.grad(y, (x, w, b), grad)

    with deterministic():
        first, second = run(), run()
    assert all(torch.equal(a, c) for a, c in zip(first, second))


@pytest.mark.skipif(not (_registry.has_ops() and _registry._C.built_with_cuda()),
                    reason="bigmodel._C was built without CUDA (BIGMODEL_CUDA=0 or no toolkit)")
def test_extension_carries_sm90_code_for_the_cublaslt_backend():
    import shutil

    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    tool = tool if os.access(tool, os.X_OK) else shutil.which("cuobjdump")
    assert tool, "no cuobjdump (triton's wheel ships one)"
    so = _registry._C.__file__
    elves = subprocess.run([tool, "--list-elf", so], capture_output=True, text=True, check=True).stdout
    assert "sm_90" in elves, f"no sm_90 cubin in {so}:\n{elves}"
    usage = subprocess.run([tool, "--dump-resource-usage", so], capture_output=True, text=True, check=True).stdout
    for kernel in ("row_absmax_kernel", "nan_fixup_kernel", "relu_output_grad_kernel", "bias_relu_mask_kernel",
                   "bias_act_kernel", "gelu_tanh_grad_kernel"):  # the last two: fused_linear's (GELU)
        assert kernel in usage, f"{kernel} missing from the extension's device code"
    for entry in ("cublaslt_linear_relu", "cublaslt_linear_relu_backward", "cublaslt_fused_linear",
                  "cublaslt_fused_linear_backward"):
        assert hasattr(_registry._C, entry), f"bigmodel._C has no {entry}"
    # The activations the C++ side takes are the ones the Python side routes to it.
    from bigmodel.ops.fused_linear import CUBLASLT_ACTIVATIONS, _OP_NAMES
    for name in ["gelu", "gelu_tanh", *_OP_NAMES.values()]:
        assert _registry._C.cublaslt_fused_linear_runs(name) == (name in CUBLASLT_ACTIVATIONS), name
