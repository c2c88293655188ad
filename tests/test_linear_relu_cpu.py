"""The C++ engine's linear_relu paths that test_linear_relu.py does not single out: results that
must not depend on the thread count on any GEMM path (oneDNN, MKL, MKL's small-output dW summed
in fixed chunks, the blocked path for outputs of 32 MB and more), and half / bfloat16 computed
in float and rounded once. tests/test_cpu_levels.py runs this file again at every CPU level
below the machine's own, where the engine picks other GEMM libraries."""
import pytest
import torch
import torch.nn.functional as F

import bigmodel
from bigmodel.ops import _registry

pytestmark = pytest.mark.skipif(not _registry.has_ops(), reason="C++ extension not built")

# (M, K, N), one per GEMM plan of csrc/cpu/linear_relu.cpp at the AVX2 and AVX512 levels: oneDNN
# for all three products; a small K (dW on MKL); N = 10 (MKL's small-output dW, chunked, and a
# dZ small enough for oneDNN at AVX512); a product below oneDNN's threshold (all MKL).
SHAPES = [(1024, 784, 512), (300, 100, 256), (4096, 256, 10), (1100, 784, 10), (64, 40, 12)]


def _grads(x, w, b, g, fn=None):
    """Output and (dx, dw, db) of the C++ engine's linear_relu, or of ``fn``."""
    with bigmodel.use_backend("cpp"):
        y = fn(x, w, b) if fn else bigmodel.linear_relu(x, w, b)
        return (y,) + torch.autograd.grad(y, (x, w, b), g)


def _eager(x, w, b):
    return F.relu(F.linear(x, w, b))


def _inputs(M, K, N, dtype=torch.float32):
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


@pytest.mark.parametrize("shape", SHAPES + [pytest.param((65536, 128, 128), id="blocked-32MB")], ids=str)
def test_thread_count_does_not_change_results(shape):
    x, w, b, g = _inputs(*shape)
    results = [_with_threads(n, lambda: _grads(x, w, b, g)) for n in (1, 2, 3)]
    for n, other in zip((2, 3), results[1:]):
        for name, a, c in zip(("y", "dx", "dw", "db"), results[0], other):
            assert torch.equal(a, c), f"{name} with {n} threads differs from 1 thread at {shape}"


def _half_ulp(ref, dtype):
    """Half the spacing of ``dtype`` at each value of ref (float64)."""
    mant = {torch.bfloat16: 7, torch.float16: 10}[dtype]
    exp = torch.floor(torch.log2(ref.abs().clamp_min(torch.finfo(dtype).tiny)))
    return torch.exp2(exp - mant - 1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", SHAPES[:3], ids=str)
def test_low_precision_is_rounded_once(dtype, shape):
    """Half and bfloat16 are computed in float (or by a native GEMM that accumulates in float)
    and rounded once: every output and gradient is within half a unit in the last place of the
    float64 result on the same rounded inputs, plus a few times the largest error float32 makes
    on them (a sum in another order can land on the other side of a rounding boundary). A second
    rounding (e.g. of the GEMM's output before the bias) would add up to another half unit."""
    x, w, b, g = _inputs(*shape, dtype=dtype)
    ours = _grads(x, w, b, g)

    def exact(t):
        return [a.detach().to(t).requires_grad_() for a in (x, w, b)] + [g.to(t)]

    ref = _grads(*exact(torch.float64), fn=_eager)
    f32 = _grads(*exact(torch.float32), fn=_eager)
    for name, o, r, f in zip(("y", "dx", "dw", "db"), ours, ref, f32):
        assert o.dtype == dtype
        excess = (o.double() - r).abs() - _half_ulp(r, dtype) - 4 * (f.double() - r).abs().max()
        assert excess.max() <= 1e-30, f"{name}: {excess.max().item():.3g} beyond one rounding at {shape}"
